import sys

from kalmannorm.lab.cli import main

sys.exit(main())
