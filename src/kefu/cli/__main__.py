from kefu.cli.main import main

raise SystemExit(main())
