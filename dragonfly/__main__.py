from dragonfly.cli import main

raise SystemExit(main())
