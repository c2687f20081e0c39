"""User prompt datasets for the LLM path, read from local files with the Hugging Face ``datasets`` library.

A dataset is a ``.jsonl``/``.json`` (JSON lines), ``.parquet`` or ``.csv`` file, or a directory written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``. It needs a ``prompt`` column; a value is either a
non-empty string or a conversation, a non-empty list of ``{"role": str, "content": str}`` whose last
message has role ``"user"``. An optional context column (``privileged_context``, the name TRL's SDPO uses)
holds privileged feedback text for the teacher; every other column is handed to reward functions.

The rows stay in Arrow, memory-mapped: :class:`PromptDataset` keeps only the numbers of the rows it keeps
(a numpy ``int32`` array, ``4 * N`` bytes, plus one epoch's order of the same size) and reads rows on demand, validating each one as it is read.

Training order (:meth:`PromptDataset.rows_for_step`): the kept rows are walked epoch by epoch, epoch ``e``
in the order ``numpy.random.default_rng([seed, e]).permutation(N)``; step ``s`` with ``n`` prompts a step
takes positions ``[s*n, (s+1)*n)`` of the concatenated epochs. The order is a pure function of
``(seed, step, n)`` and of the kept rows, so a run resumed at step ``s`` reads exactly the rows an
uninterrupted run would have read there, provided it drops the same long rows (same tokenizer, same limit).
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import datasets
import numpy as np
import pyarrow as pa

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
PROMPT_COLUMN = "prompt"
_CONVERSATION = ("a non-empty string or a conversation (a non-empty list of {'role': str, 'content': str} "
                 "whose last message has role 'user')")


def _index_dtype(n: int) -> type:
    """The smallest integer type for row numbers below ``n``: 4 bytes a row up to 2**31 rows (the kept-row index and
    one epoch's order are the only memory that grows with the dataset beyond its memory-mapped file)."""
    return np.int32 if n < 2 ** 31 else np.int64


@dataclass(frozen=True)
class PromptRow:
    """One prompt of a dataset, as the trainer uses it.

    ``prompt``: the text judges / reward functions and the teacher's reprompt see; for a conversation, the
    content of its last (user) message. ``messages``: for a conversation, the turns before that message,
    each a fresh ``{"role": str, "content": str}`` dict (other keys of a message are dropped); ``()`` for a
    plain-text prompt. ``columns``: every other column of the row (not ``prompt``, not the context column)
    as the Python values ``datasets`` decodes (str, int, float, bool, None, lists, dicts), for reward
    functions as keyword arguments. ``context``: the context column's text, ``None`` when the column is
    absent or the value is null or blank. ``index``: the row's number in the file (counting from 0).
    """

    prompt: str
    messages: tuple = ()
    columns: Mapping[str, Any] = field(default_factory=dict)
    context: Optional[str] = None
    index: int = -1


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _quiet_load(fn: Callable[[], Any]) -> Any:
    """``fn()`` with the ``datasets`` progress bars off, restored afterwards."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return fn()
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


class PromptDataset:
    """The prompts of one dataset file or ``save_to_disk`` directory; build with :meth:`load`.

    ``path``: the file or directory as given. ``column_names``: the columns handed to reward functions
    (every column but ``prompt`` and the context column), in file order. ``len()``: rows kept (all rows
    of the file or split until :meth:`drop_long` drops some). ``num_file_rows``: rows in the file or split.
    """

    def __init__(self, table: datasets.Dataset, path: str, *, field_name: str, context_column: str,
                 cache: Optional[tempfile.TemporaryDirectory] = None) -> None:
        self._table = table.with_format(None)  # plain Python values even if saved with a torch/numpy format
        self._cache = cache  # the private temporary directory holding the Arrow copy (None: none made);
        # TemporaryDirectory removes it when this object is garbage collected or the interpreter exits
        self.path = path
        self.field_name = field_name
        self.context_column = context_column
        self.column_names = [c for c in table.column_names if c not in (PROMPT_COLUMN, context_column)]
        self.num_file_rows = len(table)
        self._kept = np.arange(len(table), dtype=_index_dtype(len(table)))
        self._perms: dict[tuple[int, int], np.ndarray] = {}  # (seed, epoch) -> order of kept positions

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str, *, split: Optional[str] = None, field_name: str = "task.dataset",
             context_column: str = "privileged_context", cache_dir: Optional[str] = None) -> "PromptDataset":
        """Open the dataset at ``path`` (a ``.jsonl``/``.json``/``.parquet``/``.csv`` file or a ``save_to_disk``
        directory) and check its schema (a ``prompt`` column, at least one row); rows are checked when read.

        ``split``: for a ``DatasetDict`` directory, the split to use (default ``"train"``); must be ``None``
        for a file or a single-``Dataset`` directory. ``field_name``: how messages name the recipe field.
        ``cache_dir``: where ``datasets`` writes the Arrow copy of a file; ``None`` (default) makes a private
        temporary directory, removed with the dataset, so nothing is written into the user's cache. Nothing
        is fetched from the network: the json/parquet/csv builders ship with ``datasets``.
        """
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"{field_name}={path!r} must be the path of a dataset file or save_to_disk directory")
        path = os.fspath(path)
        where = f"{field_name}: {path}"
        if not isinstance(context_column, str) or not context_column or context_column == PROMPT_COLUMN:
            raise ValueError(f"{field_name}: context_column={context_column!r} must be a column name other "
                             f"than {PROMPT_COLUMN!r}")
        if split is not None and (not isinstance(split, str) or not split):
            raise ValueError(f"{where}: split={split!r} must be a split name or None")
        if not os.path.exists(path):
            raise ValueError(f"{where} does not exist; give a {'/'.join(FILE_FORMATS)} file or a save_to_disk "
                             f"directory")
        cache = None
        if os.path.isdir(path):
            table = cls._load_directory(path, split, where)
        else:
            suffix = os.path.splitext(path)[1].lower()
            if suffix not in FILE_FORMATS:
                raise ValueError(f"{where}: unsupported file type {suffix or '(no extension)'!r}; allowed: "
                                 f"{', '.join(FILE_FORMATS)} files or a save_to_disk directory")
            if split is not None:
                raise ValueError(f"{where}: split={split!r} given for a file; splits only apply to "
                                 f"DatasetDict.save_to_disk directories (leave split unset)")
            if os.path.getsize(path) == 0:
                raise ValueError(f"{where} is empty; it needs at least one row with a {PROMPT_COLUMN!r} column")
            if cache_dir is None:
                cache = tempfile.TemporaryDirectory(prefix="sdpo-dataset-")
            builder = FILE_FORMATS[suffix]  # data_files is a glob pattern: escape [, *, ? in the name
            try:
                table = _quiet_load(lambda: datasets.load_dataset(
                    builder, data_files=glob.escape(os.path.abspath(path)), split="train",
                    cache_dir=cache.name if cache is not None else cache_dir))
            except Exception as e:  # datasets wraps the parser's error; the cause says what is wrong
                if "corresponds to no data" in str(e):  # how datasets 5 reports a file that parsed to 0 rows
                    raise ValueError(f"{where} has no rows; it needs at least one row with a {PROMPT_COLUMN!r} "
                                     f"column") from e
                cause = e.__cause__ or e
                reason = " ".join(str(cause).split()) or type(cause).__name__
                raise ValueError(f"{where}: could not read it as {builder}{' lines' if builder == 'json' else ''}: "
                                 f"{reason[:300]}") from e
        if len(table) == 0:
            raise ValueError(f"{where} has no rows; it needs at least one row with a {PROMPT_COLUMN!r} column")
        if PROMPT_COLUMN not in table.column_names:
            raise ValueError(f"{where} has no {PROMPT_COLUMN!r} column; its columns: "
                             f"{', '.join(table.column_names) or '(none)'}")
        pa.default_memory_pool().release_unused()  # what the file → Arrow conversion held goes back to the system
        return cls(table, path, field_name=field_name, context_column=context_column, cache=cache)

    @staticmethod
    def _load_directory(path: str, split: Optional[str], where: str) -> datasets.Dataset:
        """The ``Dataset`` of a ``save_to_disk`` directory, or split ``split`` (default ``"train"``) of a
        ``DatasetDict`` one (its ``dataset_dict.json`` lists the splits, each a ``Dataset`` subdirectory);
        memory-mapped by ``load_from_disk``."""
        splits_file = os.path.join(path, "dataset_dict.json")
        if os.path.isfile(splits_file):
            try:
                with open(splits_file) as f:
                    splits = [str(s) for s in json.load(f)["splits"]]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{where}: dataset_dict.json is unreadable ({type(e).__name__}: {e}); "
                                 f"rewrite it with DatasetDict.save_to_disk") from e
            name = "train" if split is None else split
            if name not in splits:
                raise ValueError(f"{where} has no split {name!r}; its splits: {', '.join(splits) or '(none)'}")
            path, where = os.path.join(path, name), f"{where} split {name!r}"
        elif split is not None and os.path.isfile(os.path.join(path, "state.json")):
            raise ValueError(f"{where}: split={split!r} given for a Dataset.save_to_disk directory, which has no "
                             f"splits; splits only apply to DatasetDict.save_to_disk directories")
        state_file = os.path.join(path, "state.json")
        if not os.path.isfile(state_file):
            raise ValueError(f"{where} is a directory but not one written by Dataset.save_to_disk or "
                             f"DatasetDict.save_to_disk (no state.json or dataset_dict.json); give such a "
                             f"directory or a {'/'.join(FILE_FORMATS)} file")
        try:
            with open(state_file) as f:
                shards = json.load(f).get("_data_files")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{where}: state.json is unreadable ({type(e).__name__}: {e}); rewrite it with "
                             f"save_to_disk") from e
        if not shards:  # load_from_disk fails with an IndexError on a dataset saved with no rows (0 shards)
            raise ValueError(f"{where} has no rows; it needs at least one row with a {PROMPT_COLUMN!r} column")
        try:
            loaded = _quiet_load(lambda: datasets.load_from_disk(path))
        except Exception as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            raise ValueError(f"{where}: could not load the save_to_disk directory: {reason[:300]}") from e
        if not isinstance(loaded, datasets.Dataset):
            raise ValueError(f"{where}: load_from_disk gave a {type(loaded).__name__}, not a Dataset")
        return loaded

    # ------------------------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        return int(self._kept.size)

    def _where(self, index: int) -> str:
        return f"{self.field_name}: {self.path} row {index} (counting from 0)"

    def _make_row(self, index: int, values: Mapping[str, Any]) -> PromptRow:
        """Check one row's prompt and context and build its :class:`PromptRow`."""
        value = values[PROMPT_COLUMN]
        messages: tuple = ()
        if isinstance(value, str):
            prompt = value
        elif isinstance(value, (list, tuple)) and value:
            turns = []
            for k, m in enumerate(value):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"] \
                        or not isinstance(m.get("content"), str):
                    got = (f"role={_type_name(m.get('role'))}, content={_type_name(m.get('content'))}"
                           if isinstance(m, dict) else _type_name(m))
                    raise ValueError(f"{self._where(index)}: prompt message {k} is not "
                                     f"{{'role': str, 'content': str}} (got {got}); a prompt is {_CONVERSATION}")
                turns.append({"role": m["role"], "content": m["content"]})
            if turns[-1]["role"] != "user":
                raise ValueError(f"{self._where(index)}: the conversation's last message has role "
                                 f"{turns[-1]['role']!r}; it must be 'user' (a prompt is {_CONVERSATION})")
            prompt = turns[-1]["content"]
            messages = tuple(turns[:-1])
        else:
            raise ValueError(f"{self._where(index)}: prompt is {_type_name(value)}"
                             f"{' (an empty list)' if isinstance(value, (list, tuple)) else ''}; "
                             f"a prompt is {_CONVERSATION}")
        if not prompt.strip():
            what = "prompt" if isinstance(value, str) else "prompt's last user message"
            raise ValueError(f"{self._where(index)}: the {what} is empty; a prompt is {_CONVERSATION}")
        context = values.get(self.context_column)
        if context is not None and not isinstance(context, str):
            raise ValueError(f"{self._where(index)}: {self.context_column}={context!r} is {_type_name(context)}; "
                             f"it must be a string or null")
        if context is not None and not context.strip():
            context = None
        columns = {c: values[c] for c in self.column_names}
        return PromptRow(prompt=prompt, messages=messages, columns=columns, context=context, index=index)

    def _read(self, file_rows: np.ndarray) -> list[PromptRow]:
        """The rows at file positions ``file_rows`` (any order), read in one Arrow gather."""
        if file_rows.size == 0:
            return []
        batch = self._table[[int(i) for i in file_rows]]
        names = list(batch)
        return [self._make_row(int(i), {c: batch[c][k] for c in names}) for k, i in enumerate(file_rows)]

    def row(self, i: int) -> PromptRow:
        """Kept row ``i`` (``0 <= i < len(self)``, file order)."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < len(self):
            raise ValueError(f"{self.field_name}: row {i!r} is out of range; {self.path} has {len(self)} rows")
        return self._read(self._kept[int(i):int(i) + 1])[0]

    def rows(self, start: int, stop: int) -> list[PromptRow]:
        """Kept rows ``[start, stop)`` in file order, unshuffled (``stop`` is clipped to ``len(self)``)."""
        for name, v in (("start", start), ("stop", stop)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{self.field_name}: rows({name}={v!r}) must be a non-negative integer")
        if stop < start:
            raise ValueError(f"{self.field_name}: rows(start={start}, stop={stop}) needs start <= stop")
        return self._read(self._kept[int(start):int(stop)])

    # ------------------------------------------------------------------------------------------- filtering
    def drop_long(self, count_tokens: Callable[[list[PromptRow]], list[int]], max_tokens: int, *,
                  batch_size: int = 1000) -> int:
        """Keep only the rows with ``count_tokens(rows)[k] <= max_tokens``; return how many were dropped.

        ``count_tokens`` gets up to ``batch_size`` rows at a time (every row is read, so every row is
        validated) and returns one token count per row. Changes the training order: call it with the same
        function and limit on every run that must resume another. ``ValueError`` if no row is left.
        """
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
            raise ValueError(f"{self.field_name}: drop_long max_tokens={max_tokens!r} must be a positive integer")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"{self.field_name}: drop_long batch_size={batch_size!r} must be a positive integer")
        keep = np.zeros(self._kept.size, dtype=bool)
        for a in range(0, self._kept.size, int(batch_size)):
            chunk = self._read(self._kept[a:a + int(batch_size)])
            counts = list(count_tokens(chunk))
            if len(counts) != len(chunk):
                raise ValueError(f"{self.field_name}: count_tokens returned {len(counts)} counts for "
                                 f"{len(chunk)} prompts; it must return one per prompt")
            keep[a:a + len(chunk)] = np.asarray(counts, dtype=np.int64) <= max_tokens
        dropped = int(keep.size - keep.sum())
        if dropped == keep.size:
            raise ValueError(f"{self.field_name}: all {keep.size} prompts of {self.path} are longer than "
                             f"{int(max_tokens)} tokens; raise training.max_prompt_length")
        self._kept = self._kept[keep]
        self._perms.clear()
        pa.default_memory_pool().release_unused()  # the Arrow pages the batched reads used go back to the system
        return dropped

    # ------------------------------------------------------------------------------------------- order
    def _check_step(self, step: int, n: int) -> None:
        for name, v, least in (("step", step, 0), ("n", n, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < least:
                raise ValueError(f"{self.field_name}: {name}={v!r} must be an integer >= {least}")

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of kept positions: ``default_rng([seed, epoch]).permutation(len(self))``."""
        key = (int(seed), int(epoch))
        perm = self._perms.get(key)
        if perm is None:
            perm = np.random.default_rng([key[0], key[1]]).permutation(self._kept.size).astype(self._kept.dtype)
            if len(self._perms) >= 2:  # a step spans at most a few epochs: keep the last two
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = perm
        return perm

    def position(self, step: int, n: int) -> dict:
        """Where step ``step`` (``n`` prompts a step) starts: ``{"epoch": (step*n) // N, "index": (step*n) % N}``."""
        self._check_step(step, n)
        start = int(step) * int(n)
        return {"epoch": start // len(self), "index": start % len(self)}

    def rows_for_step(self, seed: int, step: int, n: int) -> list[PromptRow]:
        """The ``n`` prompts of training step ``step``: positions ``[step*n, (step+1)*n)`` of the epochs
        concatenated, epoch ``e`` ordered by ``default_rng([seed, e]).permutation(N)`` (``N = len(self)``).
        Every kept row appears once per epoch; ``n > N`` spans several epochs. ``seed``: integer >= 0."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"{self.field_name}: seed={seed!r} must be a non-negative integer")
        self._check_step(step, n)
        size = len(self)
        start, stop = int(step) * int(n), (int(step) + 1) * int(n)
        parts = []
        while start < stop:
            epoch, offset = divmod(start, size)
            take = min(size - offset, stop - start)
            parts.append(self._permutation(seed, epoch)[offset:offset + take])
            start += take
        return self._read(self._kept[np.concatenate(parts)])
