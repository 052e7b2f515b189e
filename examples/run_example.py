"""End-to-end example with the local CLI (``make example-cli``): build a tiny Llama and two
fine-tunes, merge them with the TIES recipe of examples/ties.yaml via ``weightsmith merge``,
then load the merged model with transformers and let it continue a prompt. Runs offline in
seconds. ``make example`` runs the same recipe through the service.

    python -m examples.run_example [--workdir .example]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from examples.tiny_models import PROMPT, continue_text, prepare_workdir

RECIPE = Path(__file__).resolve().parent / "ties.yaml"  # the one recipe of both examples


def main() -> int:
    work = prepare_workdir(__doc__)
    recipe = work / RECIPE.name  # next to models/: the recipe's paths are relative to it
    shutil.copyfile(RECIPE, recipe)
    out = work / "merged"
    cmd = [sys.executable, "-m", "weightsmith", "merge", str(recipe), "--out", str(out)]
    print("$ weightsmith merge", recipe, "--out", out)
    subprocess.run(cmd, check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    print(
        f"manifest: {len(manifest['files'])} files, seed {manifest['seed']}, "
        f"parents {[p['pinned'] for p in manifest['parents']]}"
    )
    print(f"merged model continues {PROMPT!r}: {continue_text(out)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
