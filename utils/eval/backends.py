"""Which runtime runs the network for inference (detect.py, test.py, evaluate()): PyTorch, or onnxruntime on an ONNX
export of the same model that is cached on disk.

--backend auto (the default of detect.py and test.py) runs onnxruntime on the CPU and PyTorch on CUDA: on the CPU
onnxruntime's fp32 forward pass was the fastest path measured, on AVX2-only and AVX-512/bf16 CPUs alike (figures:
benchmarks/README.md, bench_infer.py). PyTorch still runs where onnxruntime cannot give the same thing: a CUDA device, --half
asked for explicitly (the export is fp32), test-time augmentation, validation losses (they need the raw maps), a
model the exporter refuses (with a one-line warning), or onnxruntime not installed.

The export is cached in cache_dir() ($YOLOV3_CACHE, else $XDG_CACHE_HOME/yolov3/onnx, else ~/.cache/yolov3/onnx;
delete the folder to clear it), never beside the user's weights. Its file name is a hash of everything the exported
graph depends on (export_key): the fused model's tensors (so new weights or another cfg give another file, however
the weights file was named or touched), its cfg text, the trace size, the export options, the source of the code
that builds and exports the model, and the torch, onnx and onnxruntime versions. A new export is checked against
PyTorch before it is used and written atomically, so a crash never leaves half a model to be served.

torch is imported only where PyTorch runs or exports: a cache hit (cached_session) needs cv2, numpy and onnxruntime
only, so detect.py's start-up on the CPU skips `import torch` (see benchmarks/README.md).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np

from utils.darknet.parse_config import DEFAULT_CFG
from utils.logs import LOGGER

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

BACKENDS = ('auto', 'torch', 'onnxruntime')
CACHE_ENV = 'YOLOV3_CACHE'  # overrides the cache folder
EXPORT_TOL = 1e-4  # a fresh export whose output differs more from PyTorch's (relative) is refused; typical: 1e-6
ROOT = Path(__file__).resolve().parents[2]
# the code an exported graph depends on: a change to any of these files invalidates every cached export
GRAPH_SOURCES = ('models.py', 'utils/darknet/layers.py', 'utils/darknet/parse_config.py', 'utils/eval/export.py')


class BackendError(ValueError):
    """A --backend that cannot run here; the message says why."""


def cache_dir() -> Path:
    """The folder of cached ONNX exports: $YOLOV3_CACHE, else $XDG_CACHE_HOME/yolov3/onnx, else ~/.cache/yolov3/onnx."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(base).expanduser() / 'yolov3' / 'onnx'


def onnxruntime_available() -> bool:
    """Whether onnxruntime can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_only(device: str) -> bool:
    """Whether a --device string means the CPU, known without importing torch: 'cpu', or '' (CUDA if available) where
    this Linux machine has no NVIDIA or AMD GPU device node or CUDA_VISIBLE_DEVICES hides them all. False where that
    cannot be known so cheaply (another OS, a GPU present): select_device decides then."""
    device = str(device).strip().lower()
    if device == 'cpu':
        return True
    if device or not sys.platform.startswith('linux'):
        return False
    if os.environ.get('CUDA_VISIBLE_DEVICES', None) in ('', '-1'):
        return True
    return not (glob.glob('/dev/nvidia[0-9]*') or os.path.exists('/dev/kfd'))


def choose_backend(backend: str, device: torch.device | str, half: str = 'auto', augment: bool = False,
                   need_raw_maps: bool = False) -> str:
    """'torch' or 'onnxruntime' for --backend on device (a torch.device, or its type: 'cpu', 'cuda'); BackendError
    where onnxruntime is asked for and cannot run.

    half is the --half option as given: onnxruntime runs fp32, which auto picks over a bf16 PyTorch model (faster,
    and fp32's boxes); an explicit fp16/bf16/on keeps PyTorch."""
    if backend not in BACKENDS:
        raise BackendError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if backend == 'torch':
        return 'torch'
    kind = getattr(device, 'type', device)  # a torch.device or its type
    why = ('onnxruntime runs on the CPU only, the device is ' + str(device)) if kind != 'cpu' else \
        (f'--half {half} asks for a reduced-precision PyTorch model (onnxruntime runs the fp32 export)'
         if half not in ('auto', 'off') else
         '--augment (test-time augmentation) needs the PyTorch model' if augment else
         'validation losses need the PyTorch model' if need_raw_maps else
         'onnxruntime is not installed (pip install onnxruntime)' if not onnxruntime_available() else None)
    if why is None:
        return 'onnxruntime'
    if backend == 'onnxruntime':
        raise BackendError(f'--backend onnxruntime: {why}')
    return 'torch'


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_digest(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor of the model's state."""
    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f'{name}|{t.dtype}|{tuple(t.shape)}|'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, without a copy for contiguous tensors
    return h.hexdigest()


def _versions() -> dict[str, str]:
    """Versions of the libraries behind an export, from their metadata: `import onnx` or `import torch` alone takes
    about a second."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return 'absent'
    return {'torch': v('torch'), 'onnx': v('onnx'), 'onnxruntime': v('onnxruntime')}


def _key(parts: dict, dynamic: bool) -> str:
    """A cache file name: the hash of parts plus the export options, the graph's source files and the versions."""
    # the opset is in utils/eval/export.py, one of the hashed GRAPH_SOURCES: importing it would import torch
    common = {'dynamic': dynamic, 'fused': True,
              'code': {f: _sha((ROOT / f).read_bytes()) for f in GRAPH_SOURCES if (ROOT / f).exists()},
              **_versions()}
    return _sha(json.dumps({**parts, **common}, sort_keys=True).encode())[:32]


def export_key(model: nn.Module, img_size: tuple[int, int], dynamic: bool = True) -> str:
    """The cache key of model's export: a hash of its tensors, cfg text, trace size, export options, the graph's
    source files and the library versions (see the module's docstring)."""
    return _key({'by': 'tensors', 'tensors': model_digest(model), 'img_size': list(img_size),
                 'cfg': _sha(str(getattr(model, 'cfg_text', '')).encode())}, dynamic)


def _check_shapes(img_size: tuple[int, int], dynamic: bool) -> list[tuple[int, int, int]]:
    """(batch, h, w) inputs a new export is checked on: the trace size, and a rectangle when dynamic."""
    h, w = img_size
    return [(1, h, w)] + ([(2, max(h - 64, 64), w)] if dynamic else [])


def files_key(weights: str | Path, cfg: str | Path | None, img_size: int | None, dynamic: bool = True) -> str | None:
    """The cache key of the model load_model(weights, cfg, img_size) builds, from its files without building it: a
    hash of the weights file's bytes, the cfg text (--cfg; the default cfg for Darknet weights; a .pt without --cfg
    carries its own), the size asked for, the export options, the graph's source files and the library versions.
    None where a file cannot be read (loading the model then says why)."""
    weights = Path(weights)
    try:
        if cfg:
            cfg_text = Path(cfg).read_bytes()
        elif weights.suffix == '.pt':
            cfg_text = b''
        else:
            cfg_text = DEFAULT_CFG.read_bytes()
        with open(weights, 'rb') as f:
            weights_sha = hashlib.file_digest(f, 'sha256').hexdigest()
    except OSError:
        return None
    return _key({'by': 'files', 'weights': weights_sha, 'weights_suffix': weights.suffix, 'cfg': _sha(cfg_text),
                 'img_size': img_size}, dynamic)


def cached_export(model: nn.Module, img_size: tuple[int, int], dynamic: bool = True,
                  key: str | None = None) -> tuple[Path, bool]:
    """(path of model's ONNX export in cache_dir() under key (default: export_key), whether it was exported now):
    exported, checked against PyTorch and written atomically on a miss, with the model's class names and size as
    metadata. Raises whatever the exporter raises, or ValueError for a wrong export."""
    from utils.eval.export import check_onnx, export_onnx

    path = cache_dir() / f'{key or export_key(model, img_size, dynamic)}.onnx'
    if path.is_file():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.stem}.{os.getpid()}.check.onnx')  # checked before it gets its cache name
    meta = {'names': json.dumps(getattr(model, 'names', None)), 'img_size': json.dumps(list(img_size))}
    try:
        export_onnx(model, tmp, img_size, dynamic=dynamic, metadata=meta)
        err = check_onnx(model, tmp, _check_shapes(img_size, dynamic))
        if not err <= EXPORT_TOL:  # also refuses NaN
            raise ValueError(f'the export differs from PyTorch by {err:.1e} (relative), more than {EXPORT_TOL:g}')
        os.replace(tmp, path)  # same folder: atomic
    finally:
        tmp.unlink(missing_ok=True)
    return path, True


def session_options():
    """onnxruntime session options that follow PyTorch's OpenMP settings: its worker threads sleep when idle under
    OMP_WAIT_POLICY=PASSIVE (what detect.py and test.py set), so a busy machine does not stall every op, and
    OMP_NUM_THREADS, when set, is its thread count too (onnxruntime reads neither variable itself)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if os.environ.get('OMP_WAIT_POLICY', '').upper() == 'PASSIVE':
        so.add_session_config_entry('session.intra_op.allow_spinning', '0')
    threads = os.environ.get('OMP_NUM_THREADS', '')
    if threads.isdigit() and int(threads) > 0:
        so.intra_op_num_threads = int(threads)
    return so


class OrtModel:
    """An ONNX export run by onnxruntime on the CPU: (B, 3, h, w) float32 RGB in [0, 1] -> (B, N, 5 + nc) tensor
    (predict: numpy in and out, for callers without torch)."""

    def __init__(self, path: str | Path):
        import onnxruntime as ort

        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), session_options(), providers=['CPUExecutionProvider'])
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name = inp.name
        h, w = inp.shape[2:4]
        # a fixed export takes exactly its size; a dynamic one any multiple of 32, letterboxed as for PyTorch
        self.img_hw = (h, w) if isinstance(h, int) and isinstance(w, int) else None
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None  # None: any batch size
        if not isinstance(out.shape[-1], int):
            raise ValueError(f"{path}: the output's last dimension (5 + classes) is not fixed ({out.shape}); "
                             f"export the model with `python models.py --onnx`")
        self.nc = out.shape[-1] - 5
        self.meta = self.session.get_modelmeta().custom_metadata_map  # cached exports: names, img_size (JSON)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The model's inference output (B, N, 5 + nc) float32 for a float32 batch (B, 3, h, w), any memory layout."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.batch is None:
            return self.session.run(None, {self.input_name: x})[0]
        return np.concatenate([self.session.run(None, {self.input_name: xi[None]})[0] for xi in x])

    def __call__(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """predict() as a tensor, for a float32 batch as a numpy array or a CPU tensor."""
        import torch

        return torch.from_numpy(self.predict(x.numpy() if isinstance(x, torch.Tensor) else x))


def runtime_for(model: nn.Module, backend: str, img_size: int | tuple[int, int], strict: bool = False,
                log: Callable[[str], None] = LOGGER.info, key: str | None = None) -> nn.Module | OrtModel:
    """The runner for a resolved backend ('torch' or 'onnxruntime', see choose_backend): the model itself, or an
    OrtModel of its cached dynamic-shape export. A model that cannot be exported falls back to PyTorch with a
    warning (BackendError when strict: onnxruntime was asked for by name). Logs one line saying which runtime runs."""
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if backend == 'onnxruntime':
        try:
            path, fresh = cached_export(model, hw, key=key)
            runner = OrtModel(path)
        except Exception as e:  # noqa: BLE001  the exporter raises many kinds; every one means "run PyTorch"
            why = f'the model could not be exported ({type(e).__name__}: {(str(e).splitlines() or [""])[0]})'
            if strict:
                raise BackendError(f'--backend onnxruntime: {why}') from e
            LOGGER.warning(f'onnxruntime: {why}; running PyTorch instead')
        else:
            _log_ort(path, fresh, log)
            return runner
    import torch

    dtype = next(model.parameters()).dtype
    log(f"Runtime: PyTorch {torch.__version__} {next(model.parameters()).device.type}, "
        f"{str(dtype).replace('torch.', '')}")
    return model


def _log_ort(path: Path, fresh: bool, log: Callable[[str], None]) -> None:
    """The one line saying onnxruntime runs, on which export."""
    import onnxruntime
    what = 'new export' if fresh else 'cached export'
    log(f'Runtime: onnxruntime {onnxruntime.__version__} CPU, fp32, {what} {path}')


class Loaded(NamedTuple):
    """What load_runtime gives: the runner and what the caller needs to know of the model."""
    run: nn.Module | OrtModel
    nc: int  # classes
    names: list[str] | None  # class names the weights carry (or COCO's for 80-class Darknet weights), else None
    img_size: int  # the size asked for, else the cfg's [net] width


def load_runtime(weights: str | Path, cfg: str | Path | None, img_size: int | None, backend: str,
                 build: Callable[[int], nn.Module], strict: bool = False,
                 log: Callable[[str], None] = LOGGER.info) -> Loaded:
    """The network of weights + cfg run by the resolved backend. For onnxruntime a cached export is found by
    files_key, without building the PyTorch model; otherwise build(size) builds it (fused, eval) and runtime_for
    exports it under that key. size: img_size, else 416 (the cfg's width is read from the built model)."""
    key = files_key(weights, cfg, img_size) if backend == 'onnxruntime' else None
    hit = cached_session(key, log) if key is not None else None
    if hit is not None:
        return hit
    model = build(img_size or 416)
    size = img_size or int(getattr(model, 'hyperparams', {}).get('width', 416))
    run = runtime_for(model, backend, size, strict, log, key)
    return Loaded(run, model.nc, getattr(model, 'names', None), size)


def cached_session(key: str, log: Callable[[str], None] = LOGGER.info) -> Loaded | None:
    """The onnxruntime session of the cached export under key (files_key), or None where there is none; an unreadable
    entry is deleted (and exported again by the caller). Needs no torch. Logs the one Runtime line on a hit."""
    path = cache_dir() / f'{key}.onnx'
    if not path.is_file():
        return None
    try:
        run = OrtModel(path)
        names, size = json.loads(run.meta['names']), json.loads(run.meta['img_size'])[0]
    except Exception as e:  # noqa: BLE001  an unreadable cache entry is exported again
        LOGGER.warning(f'{path}: cannot be used ({type(e).__name__}: {e}); exporting again')
        path.unlink(missing_ok=True)
        return None
    _log_ort(path, False, log)
    return Loaded(run, run.nc, names, int(size))
