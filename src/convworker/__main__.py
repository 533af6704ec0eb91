from convworker.cli import main

main()
