#!/usr/bin/env bash
# Downloads (here, where pip reaches an index) the wheels that the GPU machine lacks for gpu_check.sh into
# .whl/ (git-ignored through .git/info/exclude): diffusers (the baseline) with the two packages it needs
# that the GPU image does not have, at the versions the test extra installs here (setup.py pins diffusers),
# so both machines run the same baseline. gpu_check.sh installs .whl/*.whl into /tmp/site first; pass
# carry [".whl"] to the device call (6.2 MB; the device tool carries 64 MiB at most). imageio-ffmpeg (mp4 writing, 68 MB) is left out:
# no `gpu` test or benchmark writes a video.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
# (+ ftfy and wcwidth: the engine's prompt cleaning, as Wan's)
# (+ pytest-xdist and execnet: gpu_check.sh runs the `gpu` tests in 4 processes when xdist is importable)
for spec in diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 ftfy==6.3.1 wcwidth==0.9.4 \
    pytest-xdist==3.8.0 execnet==2.1.2; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
ls -l .whl
