import sys

from flylora.cli import main

sys.exit(main())
