"""Safe file input/output: atomic writes, pickle-free weight loading, verifiable output sets.

* :mod:`.atomic` -- atomic writes (temporary file, fsync, rename) and plain reads.
* :mod:`.state_dict` -- a user's weights file, judged by its content, without pickle.
* :mod:`.output_set` -- multi-file outputs written all-or-nothing and checked by checksum.
* :mod:`.locations` -- where caches live.
* :mod:`.paths` -- what a path is, in words (a FIFO, a device, a directory given as a file).
"""

from .atomic import (
                     atomic_path,
                     atomic_write_bytes,
                     atomic_write_json,
                     atomic_write_text,
                     file_sha256,
                     fsync_dir,
                     load_tensors,
                     read_json,
                     save_tensors,
)
from .locations import user_cache_dir
from .output_set import (
                     SUMMARY_FILE,
                     check_output_dir,
                     is_plain_name,
                     lock_path,
                     output_lock,
                     output_set,
                     prepare_output_dir,
                     real_output_dir,
                     recover_output_dir,
                     staging_path,
                     verify_output_set,
)
from .paths import path_kind, require_dir, require_file
from .state_dict import load_state_dict, sniff_weights_format

__all__ = [
    "atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "file_sha256", "fsync_dir",
    "load_tensors", "read_json", "save_tensors", "user_cache_dir", "SUMMARY_FILE", "check_output_dir",
    "output_set", "prepare_output_dir", "recover_output_dir", "staging_path", "verify_output_set",
    "load_state_dict", "sniff_weights_format", "is_plain_name", "lock_path", "output_lock", "real_output_dir",
    "path_kind", "require_dir", "require_file",
]
