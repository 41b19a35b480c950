from datainf_core.cli import main

raise SystemExit(main())
