import sys

if "--hf" in sys.argv[1:]:  # python -m bench --hf [...]: the Hugging Face benchmark (bench/hf.py)
    from bench.hf import main as hf_main

    raise SystemExit(hf_main([arg for arg in sys.argv[1:] if arg != "--hf"]))

from bench.run import main

raise SystemExit(main())
