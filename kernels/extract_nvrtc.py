"""Extracts libnvrtc.so.13 and its builtins library from the downloaded
nvidia-cuda-nvrtc wheel in DIR/wheel into DIR (used by `make nvrtc`)."""
import glob
import os
import shutil
import sys
import zipfile

out = sys.argv[1]
wheels = glob.glob(os.path.join(out, "wheel", "nvidia_cuda_nvrtc-*.whl"))
if not wheels:
    sys.exit("no nvidia_cuda_nvrtc wheel in " + os.path.join(out, "wheel"))
with zipfile.ZipFile(wheels[0]) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if base in ("libnvrtc.so.13", "libnvrtc-builtins.so.13.0"):
            with z.open(name) as src, open(os.path.join(out, base), "wb") as dst:
                shutil.copyfileobj(src, dst)
shutil.rmtree(os.path.join(out, "wheel"))
for lib in ("libnvrtc.so.13", "libnvrtc-builtins.so.13.0"):
    if not os.path.exists(os.path.join(out, lib)):
        sys.exit("the wheel has no " + lib)
