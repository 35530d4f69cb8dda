from danlu.cli import main

raise SystemExit(main())
