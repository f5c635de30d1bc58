from sana.cli.main import main

raise SystemExit(main())
