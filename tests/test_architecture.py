"""Import boundaries: the core package stays free of ray, redis and wandb."""

import pkgutil
import subprocess
import sys

import tide


def test_core_imports_no_ray_redis_wandb():
    modules = [m.name for m in pkgutil.walk_packages(tide.__path__, "tide.")
               if ".transport" not in m.name]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "bad = [m for m in ('ray', 'redis', 'wandb') if m in sys.modules]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert len(modules) >= 8
    assert out.stdout.strip() == "", f"core imports {out.stdout.strip()}"
