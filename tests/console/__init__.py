"""The operator console in a real browser: Debian's Chromium driven by Playwright."""
