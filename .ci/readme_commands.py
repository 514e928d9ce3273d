"""Print the README's set-up commands, one per line, exactly as a user would copy them.

They are the lines of the first fenced ``bash`` block under the heading "## Set-up", without
their trailing ``# comment``. ``.ci/run`` runs them, so CI tests what the README tells users.
"""

import re
import sys
from pathlib import Path


def setup_commands(readme: str) -> list[str]:
    section = readme.split("\n## Set-up", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    if block is None:
        raise SystemExit("README.md: no ```bash block under '## Set-up'")
    return [line.split("  #", 1)[0].strip() for line in block[1].splitlines() if line.strip()]


if __name__ == "__main__":
    print("\n".join(setup_commands(Path(sys.argv[1]).read_text())))
