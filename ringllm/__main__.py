from ringllm.cli import main

raise SystemExit(main())
