from convsvc.cli import main

raise SystemExit(main())
