import sys

from kalmannorm.cli import main

sys.exit(main())
