"""The package layout: kernels/ is reached as mae_fast.kernels from a checkout, an editable install and a wheel,
and the top-level kernels/ folder never stands in for another package named ``kernels`` (Hugging Face's, which
transformers imports) when Python runs from the repository root."""
import importlib
import os
import subprocess
import sys

import mae_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_FILES = sorted(f for f in os.listdir(os.path.join(ROOT, "kernels")) if f.endswith(".py"))

# where `import kernels` resolves: (origin file or None, namespace search locations, a top-level name it defines)
PROBE = ("import importlib.util, json; s = importlib.util.find_spec('kernels'); "
         "print(json.dumps(None if s is None else [s.origin, list(s.submodule_search_locations or [])]))")


def _python(code: str, cwd, *flags: str, pythonpath: str = "") -> str:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    res = subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.strip()


def test_extension_and_kernels_subpackage():
    assert isinstance(mae_fast._C.cuda_compiled(), bool)
    package = importlib.import_module("mae_fast.kernels")
    assert package.__name__ == "mae_fast.kernels"
    locations = [os.path.realpath(p) for p in package.__path__]
    assert os.path.realpath(os.path.join(ROOT, "kernels")) in locations
    assert "add_layer_norm.py" in KERNEL_FILES and "__init__.py" not in KERNEL_FILES


def test_plain_checkout_imports_kernels(tmp_path):
    """From the checkout on sys.path alone (the editable-install hook removed), mae_fast.kernels resolves to
    the top-level kernels/ folder."""
    code = (f"import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            f"sys.path.insert(0, {ROOT!r}); import mae_fast.kernels.gather_tokens as k, os; "
            f"print(os.path.realpath(k.__file__))")
    assert _python(code, tmp_path) == os.path.join(os.path.realpath(ROOT), "kernels", "gather_tokens.py")


def test_wheel_holds_the_kernel_files(tmp_path):
    """What a wheel packs (setup.py's build_py: the Python files, not the extension): every kernels/*.py as a
    file of mae_fast/kernels/, the link followed."""
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    built = tmp_path / "mae_fast" / "kernels"
    assert sorted(p.name for p in built.glob("*.py")) == KERNEL_FILES
    assert not built.is_symlink() and not any(p.is_symlink() for p in built.iterdir())


def test_root_kernels_folder_yields_to_a_real_package(tmp_path):
    """Run from the repository root (its folder first on sys.path), `import kernels` finds a regular package
    of that name later on sys.path, not the repository's kernels/ folder."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'the installed package'\n")
    code = "import sys, kernels; print(sys.path[0] == '', kernels.WHO)"
    assert _python(code, ROOT, pythonpath=str(site)) == "True the installed package"


def test_root_kernels_folder_runs_no_code_of_ours():
    """With no other `kernels` on sys.path (-S: no site-packages), what the root offers under that name is a
    bare namespace: no file of the repository runs as `kernels`."""
    code = ("import sys, kernels; print(getattr(kernels, '__file__', None), "
            "sorted(n for n in sys.modules if n.startswith('kernels')))")
    assert _python(code, ROOT, "-S") == "None ['kernels']"


def test_import_kernels_from_root_matches_outside(tmp_path):
    """Whatever is installed here, `import kernels` resolves from the repository root exactly as from a neutral
    folder (an installed package's file), or to no file at all where nothing is installed."""
    import json

    outside = json.loads(_python(PROBE, tmp_path))
    at_root = json.loads(_python(PROBE, ROOT))
    if outside is not None:
        assert at_root[0] == outside[0] and at_root[0] is not None
    else:
        assert at_root[0] is None  # the bare namespace portion, nothing of ours imported
