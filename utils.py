"""What the stage scripts at the root share and the library does not need: how a script runs.

The library is the `regmean` package (docs/layout.md); the presets, the row formats and the
settings with their defaults live there, since its functions take preset names too.
"""

import os
import sys

from regmean.utils import UserError


def run_main(main):
    """Run a stage's main(); a UserError becomes one clear line on stderr and exit 2. In a log (stderr
    not a terminal) the libraries' progress bars are off too, as ours are (Progress)."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers, datasets; lm_eval's children
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        if "transformers" in sys.modules:  # it reads the setting once, at import
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
