from banger_build.cli import main

raise SystemExit(main())
