from weakseg.cli import main

raise SystemExit(main())
