import sys

from pytest_upstream.cli.main import main

sys.exit(main())
