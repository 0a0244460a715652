"""Torch-free reading and writing of PyTorch checkpoint files and safetensors files.

PyTorch's `torch.save` format (also Lightning `.ckpt` and HF `pytorch_model.bin`) is a zip holding
`<root>/data.pkl` (a protocol-2 pickle) and one raw little-endian storage per `<root>/data/<key>`.
Tensors are pickled as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`,
storages as persistent ids `('storage', torch.FloatStorage, key, location, numel)`. Dtypes without
a typed storage class (float8, uint16/32/64) use `_rebuild_tensor_v3(UntypedStorage, ..., dtype)`.

`load` unpickles with a restricted Unpickler: tensors become numpy arrays (bfloat16 / float8 through
ml_dtypes), a short list of harmless builtins / collections / numpy reconstructors is allowed, and
every other global (Lightning, omegaconf, ...) becomes an inert `Stub` that records its arguments
and state. No code from the file ever runs. Storages are memory-mapped, so tensors nobody touches
(e.g. optimizer states) are never read from disk.

`save` writes the same layout (protocol 2, 64-byte aligned records) from nested Python containers
holding numpy arrays, so the official PyTorch code can `torch.load` our exports.

`read_safetensors` / `write_safetensors` implement the safetensors format directly (the
`safetensors` package's numpy backend has no bfloat16).
"""
from __future__ import annotations

import codecs
import collections
import io
import json
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping, Optional

import ml_dtypes
import numpy as np

from didi_jax import errors

# Storage class name -> numpy dtype.
STORAGE_DTYPES = {
    'FloatStorage': np.dtype(np.float32),
    'DoubleStorage': np.dtype(np.float64),
    'HalfStorage': np.dtype(np.float16),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
    'ComplexFloatStorage': np.dtype(np.complex64),
    'ComplexDoubleStorage': np.dtype(np.complex128),
    'Float8_e4m3fnStorage': np.dtype(ml_dtypes.float8_e4m3fn),
    'Float8_e5m2Storage': np.dtype(ml_dtypes.float8_e5m2),
    'UntypedStorage': np.dtype(np.uint8),
}
_DTYPE_TO_STORAGE = {v: k for k, v in STORAGE_DTYPES.items() if k != 'UntypedStorage'}
# dtypes torch has no typed storage class for: pickled as _rebuild_tensor_v3(UntypedStorage, ...,
# torch.<dtype>), as torch.save writes them.
V3_DTYPES = {'float8_e4m3fn': np.dtype(ml_dtypes.float8_e4m3fn),
             'float8_e5m2': np.dtype(ml_dtypes.float8_e5m2), 'uint16': np.dtype(np.uint16),
             'uint32': np.dtype(np.uint32), 'uint64': np.dtype(np.uint64)}
_V3_NAME = {v: k for k, v in V3_DTYPES.items()}


# A file is not a readable PyTorch zip / safetensors file (the message says why and what to do).
TorchFormatError = errors.CheckpointFormatError


# ----------------------------------------------------------------------------------------------
# Reading.


class Stub:
  """Inert stand-in for an object of a class we do not load (Lightning/omegaconf/...).

  `module`/`name` say what it was; `args`, `state`, `items`, `list` hold what the pickle gave it.
  """
  module = ''
  name = ''

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.args, obj.kwargs, obj.state, obj.items, obj.list = args, kwargs, None, {}, []
    return obj

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items[key] = value

  def __getitem__(self, key):
    return self.items[key]

  def append(self, value):
    self.list.append(value)

  def extend(self, values):
    self.list.extend(values)

  def __repr__(self):
    return f'<Stub {self.module}.{self.name}>'


_STUBS: dict[tuple[str, str], type] = {}


def _stub_class(module: str, name: str) -> type:
  key = (module, name)
  if key not in _STUBS:
    _STUBS[key] = type(f'Stub[{module}.{name}]', (Stub,), {'module': module, 'name': name})
  return _STUBS[key]


class _StorageType:
  """What `torch.FloatStorage` & co. unpickle to: just a dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = STORAGE_DTYPES[name]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """`torch._utils._rebuild_tensor_v2` without torch: a numpy view/copy of the storage."""
  del unused
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  n = int(np.prod(size)) if size else 1
  if n == 0:
    return np.zeros(size, storage.dtype)
  contiguous = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
  if stride == contiguous or n == 1:
    return storage[storage_offset:storage_offset + n].reshape(size)
  last = storage_offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
  if min(stride) < 0 or last >= storage.shape[0]:
    raise TorchFormatError(f'tensor with size {size} and stride {stride} overruns its storage')
  base = np.ascontiguousarray(storage[storage_offset:last + 1])
  strides = tuple(st * base.itemsize for st in stride)
  raw = base.view(np.dtype((np.void, base.itemsize)))   # as_strided rejects float8 dtypes
  return np.lib.stride_tricks.as_strided(raw, size, strides).copy().view(base.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       *unused):
  """`torch._utils._rebuild_tensor_v3`: an untyped (byte) storage viewed as `dtype`."""
  del requires_grad, backward_hooks, unused
  if not isinstance(dtype, np.dtype):
    raise TorchFormatError(f'tensor of unsupported dtype {dtype!r}')
  return _rebuild_tensor(storage.view(np.uint8).view(dtype), storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  del requires_grad, backward_hooks, unused
  return data


def _safe_reconstructor(cls, base, state):
  """copyreg._reconstructor, allowed only for stubs and plain containers."""
  if isinstance(cls, type) and issubclass(cls, Stub):
    return cls()
  if cls in (dict, list, collections.OrderedDict) and base is object:
    return cls()
  return _stub_class('copyreg', '_reconstructor')(cls, base, state)


_BUILTINS = {'dict': dict, 'list': list, 'tuple': tuple, 'set': set, 'frozenset': frozenset,
             'int': int, 'float': float, 'complex': complex, 'bool': bool, 'str': str,
             'bytes': bytes, 'bytearray': bytearray, 'slice': slice, 'range': range}
_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('collections', 'defaultdict'): collections.defaultdict,
    ('_codecs', 'encode'): codecs.encode,
    ('copyreg', '_reconstructor'): _safe_reconstructor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch', 'Size'): tuple,
}
_np_multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
for _mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
  _ALLOWED[(_mod, '_reconstruct')] = _np_multiarray._reconstruct
  _ALLOWED[(_mod, 'scalar')] = _np_multiarray.scalar
_ALLOWED[('numpy', 'ndarray')] = np.ndarray
_ALLOWED.update({('torch', name): dtype for name, dtype in V3_DTYPES.items()})
_ALLOWED[('numpy', 'dtype')] = np.dtype


class _Unpickler(pickle.Unpickler):
  """Maps torch tensors/storages to numpy; everything unknown becomes a Stub."""

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == 'builtins' and name in _BUILTINS:
      return _BUILTINS[name]
    if module in ('torch', 'torch.storage', 'torch.cuda') and name in STORAGE_DTYPES:
      return _StorageType(name)
    if module.startswith('numpy') and name.endswith('DType'):   # numpy 2 dtype classes
      return np.dtype
    return _stub_class(module, name)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise TorchFormatError(f'unsupported persistent id {pid!r} (expected a torch storage)')
    _, storage_type, key, _location, _numel = pid
    if not isinstance(storage_type, _StorageType):
      raise TorchFormatError(f'storage of unknown type {storage_type!r}')
    return self._load_storage(str(key), storage_type.dtype)


def _stored_data_offset(fp, info: zipfile.ZipInfo) -> int:
  fp.seek(info.header_offset)
  header = fp.read(30)
  if header[:4] != b'PK\x03\x04':
    raise TorchFormatError(f'bad zip local header for {info.filename}')
  name_len, extra_len = struct.unpack('<HH', header[26:30])
  return info.header_offset + 30 + name_len + extra_len


def is_torch_zip(path: str) -> bool:
  """True if `path` is a zip holding a `data.pkl` (the torch.save format since torch 1.6)."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as zf:
    return any(n.endswith('data.pkl') for n in zf.namelist())


def load(path: str, *, mmap: bool = True) -> Any:
  """Loads a `torch.save` file without torch; tensors come back as numpy arrays."""
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    raise TorchFormatError(
        f'{path} is not a zip-format PyTorch file (legacy torch<1.6 format or not torch at all): '
        're-save it with torch>=1.6 torch.save(obj, path), or convert it to safetensors')
  with zipfile.ZipFile(path) as zf:
    pkls = [n for n in zf.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pkls) != 1:
      raise TorchFormatError(f'{path} has {len(pkls)} <root>/data.pkl records (expected one): '
                             'not a torch.save file')
    root = pkls[0][:-len('data.pkl')]
    infos = {i.filename: i for i in zf.infolist()}
    byteorder = 'little'
    if root + 'byteorder' in infos:
      byteorder = zf.read(root + 'byteorder').decode().strip()
    if byteorder != 'little':
      raise TorchFormatError(f'{path} was saved big-endian; re-save it on a little-endian machine')
    cache: dict[str, np.ndarray] = {}
    whole: list = []   # one read-only map of the file, shared by all storages (one descriptor)

    def load_storage(key: str, dtype: np.dtype) -> np.ndarray:
      if key not in cache:
        info = infos.get(f'{root}data/{key}')
        if info is None:
          raise TorchFormatError(f'{path} lacks storage record {root}data/{key}')
        nbytes = info.file_size - info.file_size % dtype.itemsize
        if mmap and info.compress_type == zipfile.ZIP_STORED and nbytes > 0:
          if not whole:
            whole.append(np.asarray(np.memmap(path, dtype=np.uint8, mode='r')))
          with open(path, 'rb') as fp:
            offset = _stored_data_offset(fp, info)
          cache[key] = whole[0][offset:offset + nbytes]
        else:
          cache[key] = np.frombuffer(zf.read(info)[:nbytes], dtype=np.uint8)
      return cache[key].view(dtype)

    with zf.open(pkls[0]) as f:
      return _Unpickler(io.BytesIO(f.read()), load_storage).load()


# ----------------------------------------------------------------------------------------------
# Writing.


class _Global:
  """A `module.name` reference written as a pickle GLOBAL without importing the module."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise TypeError(f'{self.module}.{self.name} is only a pickle reference')


_REBUILD_V2 = _Global('torch._utils', '_rebuild_tensor_v2')
_REBUILD_V3 = _Global('torch._utils', '_rebuild_tensor_v3')
_UNTYPED_STORAGE = _Global('torch.storage', 'UntypedStorage')
_V3_GLOBALS = {dtype: _Global('torch', name) for name, dtype in V3_DTYPES.items()}
_STORAGE_GLOBALS = {name: _Global('torch', name) for name in STORAGE_DTYPES}


class _Storage:

  def __init__(self, key: str, data: np.ndarray):
    self.key, self.data = key, data


class _Tensor:
  """A tensor view into a storage (used by `save` for arrays; tests use it for strided views)."""

  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _Pickler(pickle._Pickler):  # pure-Python pickler: its dispatch table is extensible
  dispatch = pickle._Pickler.dispatch.copy()

  def __init__(self, file):
    super().__init__(file, protocol=2)
    self.storages: list[_Storage] = []
    self._storage_ids: dict[int, _Storage] = {}
    self._next_key = 0

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      if id(obj) not in self._storage_ids:
        self._storage_ids[id(obj)] = obj
        self.storages.append(obj)
      if obj.data.dtype in _V3_NAME:
        return ('storage', _UNTYPED_STORAGE, obj.key, 'cpu', int(obj.data.nbytes))
      name = _DTYPE_TO_STORAGE[obj.data.dtype]
      return ('storage', _STORAGE_GLOBALS[name], obj.key, 'cpu', int(obj.data.size))
    return None

  def _save_global_ref(self, obj: _Global):
    self.write(pickle.GLOBAL + obj.module.encode() + b'\n' + obj.name.encode() + b'\n')
    self.memoize(obj)

  def _reduce_tensor(self, storage: _Storage, offset, size, stride, obj):
    args = (storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride),
            False, collections.OrderedDict())
    if storage.data.dtype in _V3_NAME:
      self.save_reduce(_REBUILD_V3, args + (_V3_GLOBALS[storage.data.dtype],), obj=obj)
    else:
      self.save_reduce(_REBUILD_V2, args, obj=obj)

  def _save_tensor(self, obj: _Tensor):
    self._reduce_tensor(obj.storage, obj.offset, obj.size, obj.stride, obj)

  def _save_ndarray(self, arr: np.ndarray):
    if arr.dtype not in _DTYPE_TO_STORAGE and arr.dtype not in _V3_NAME:
      raise TypeError(f'cannot store dtype {arr.dtype} in a torch file')
    storage = _Storage(str(self._next_key), np.ascontiguousarray(arr).reshape(-1))
    self._next_key += 1
    size = tuple(int(s) for s in arr.shape)
    stride = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    self._reduce_tensor(storage, 0, size, stride, arr)

  dispatch[_Global] = _save_global_ref
  dispatch[_Tensor] = _save_tensor
  dispatch[np.ndarray] = _save_ndarray
  dispatch[np.memmap] = _save_ndarray


def _aligned_extra(offset: int, name: str, align: int = 64) -> bytes:
  """A zip extra field padding the record data start to `align` bytes (as torch does)."""
  start = offset + 30 + len(name.encode()) + 4
  pad = (-start) % align
  return b'FB' + struct.pack('<H', pad) + b'Z' * pad


def save(obj: Any, path: str, *, root: str = 'archive') -> None:
  """Writes `obj` (dicts/lists/tuples/scalars/str/numpy arrays) in torch.save's zip format."""
  buf = io.BytesIO()
  pickler = _Pickler(buf)
  pickler.dump(obj)
  storages = pickler.storages
  if len({s.key for s in storages}) != len(storages):
    raise ValueError('two different storages share one key')
  records = [(f'{root}/data.pkl', buf.getvalue()), (f'{root}/byteorder', b'little')]
  records += [(f'{root}/data/{s.key}', s.data.tobytes()) for s in storages]
  records += [(f'{root}/version', b'3\n')]
  tmp = os.fspath(path) + '.tmp'
  with open(tmp, 'wb') as fp, zipfile.ZipFile(fp, 'w', zipfile.ZIP_STORED) as zf:
    for name, data in records:
      info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_STORED
      info.extra = _aligned_extra(fp.tell(), name)
      zf.writestr(info, data)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# safetensors.

SAFETENSORS_DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U64': np.dtype(np.uint64),
    'U32': np.dtype(np.uint32), 'U16': np.dtype(np.uint16), 'U8': np.dtype(np.uint8),
    'BOOL': np.dtype(np.bool_), 'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
    'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2),
}
_DTYPE_TO_ST = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def read_safetensors(path: str, *, mmap: bool = True
                     ) -> tuple['collections.OrderedDict[str, np.ndarray]', dict]:
  """Returns ({name: array} in file order, metadata). Arrays are read-only memory maps."""
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise TorchFormatError(f'{path} is too short to be a safetensors file')
    (n,) = struct.unpack('<Q', head)
    if n > size - 8 or n > 100_000_000:
      raise TorchFormatError(f'{path} is not a safetensors file (header length {n})')
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise TorchFormatError(f'{path} has a corrupt safetensors header: {e}') from None
  metadata = header.pop('__metadata__', None) or {}
  base = 8 + n
  entries = sorted(header.items(), key=lambda kv: kv[1]['data_offsets'][0])
  data = np.asarray(np.memmap(path, np.uint8, 'r')) if mmap and size > base else None
  if data is None:
    with open(path, 'rb') as f:
      data = np.frombuffer(f.read(), np.uint8)
  out = collections.OrderedDict()
  for name, e in entries:
    if e['dtype'] not in SAFETENSORS_DTYPES:
      raise TorchFormatError(f'{path}: tensor {name} has unsupported dtype {e["dtype"]}')
    dtype = SAFETENSORS_DTYPES[e['dtype']]
    shape = tuple(int(s) for s in e['shape'])
    begin, end = (int(o) for o in e['data_offsets'])
    count = int(np.prod(shape)) if shape else 1
    if end - begin != count * dtype.itemsize or base + end > size:
      raise TorchFormatError(f'{path}: tensor {name} has inconsistent offsets {begin}..{end} '
                             f'for shape {shape} {e["dtype"]}')
    out[name] = data[base + begin:base + end].view(dtype).reshape(shape)
  return out, dict(metadata)


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str,
                      metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes `tensors` (in the given order) as a safetensors file; metadata values are strings."""
  header: dict = {}
  if metadata:
    header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  arrays = []
  for name, arr in tensors.items():
    arr = np.asarray(arr)
    if arr.dtype not in _DTYPE_TO_ST:
      raise TypeError(f'cannot store {name} of dtype {arr.dtype} in safetensors')
    arr = np.ascontiguousarray(arr)
    header[name] = {'dtype': _DTYPE_TO_ST[arr.dtype], 'shape': list(arr.shape),
                    'data_offsets': [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays.append(arr)
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * ((-len(blob)) % 8)
  tmp = os.fspath(path) + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for arr in arrays:
      f.write(arr.tobytes())
  os.replace(tmp, path)

