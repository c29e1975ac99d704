"""The one overwrite policy, for every output the project writes: main.py's run folders, evaluate.py's and
compare.py's --save_dir, --out and --gif, main.py --export's files.

A folder or a file is ours only if it carries our marker. A folder's marker is a file the tool writes into it first,
before anything else (main.py's rundir.RUN_MARKER, evaluate.py's SAVE_DIR_MARKER, which compare.py writes too); a
file's marker is inside it (evaluate.py's JSON "written_by": "evaluate.py", its GIF comment). What is ours the same
tool may continue or replace (a new main.py run only what a run killed before its first checkpoint left; --resume
the whole run); anything else is never overwritten: a folder without the marker that holds anything, a file without
the marker (export marks none, so it never replaces a file), a symbolic link (utils.refuse_link). atomic_write's temp
files (utils.TEMP_NAME) are no one's: they never keep a tool out of a folder, and the tool that writes there clears
them (utils.remove_stale_temps). One process writes a folder at a time: claiming it takes its lock
(utils.lock_folder), held until the process ends; another process meeting the lock is refused or goes elsewhere.
A refusal is one line (UserError) naming the path, in each tool's own words.
"""
import os

from utils import TEMP_NAME, UserError, atomic_write, lock_folder, unlock


def entries_in_the_way(folder, marker, replaceable=()):
    """The entries of `folder` that keep a tool with this marker from writing there ([]: it may). A missing folder, an
    empty one or one holding only temp files keeps no one out; without the marker every other entry is in the way;
    with it, every entry but the marker and the names in `replaceable` (None: the tool may replace anything there)."""
    entries = [f for f in os.listdir(folder) if not TEMP_NAME.match(f)] if os.path.isdir(folder) else []
    if marker not in entries:
        return entries
    return [] if replaceable is None else [f for f in entries if f != marker and f not in replaceable]


def folder_is_busy(folder):
    """Whether another process holds `folder`'s lock now (is writing it)."""
    if not os.path.isdir(folder):
        return False
    lock = lock_folder(folder)
    unlock(lock)
    return lock is None


def claim_folder(folder, marker, marker_text, replaceable=()):
    """Make `folder` this process's output folder: create it, take its lock, check under the lock that nothing is in
    the way (`entries_in_the_way`), then write the marker first. The lock (hold it while writing; a killed process
    lets go of it), or None when another process holds the folder or something is in the way."""
    os.makedirs(folder, exist_ok=True)
    lock = lock_folder(folder)
    if lock is None or entries_in_the_way(folder, marker, replaceable):
        unlock(lock)
        return None
    atomic_write(os.path.join(folder, marker), lambda f: f.write(marker_text))
    return lock


def refuse_unless_ours(path, is_ours, refusal):
    """UserError(refusal) when anything is at `path` (a dangling link too) that `is_ours(path)` does not accept
    (is_ours None: nothing there is ours, so nothing is replaced)."""
    if os.path.lexists(path) and not (is_ours is not None and is_ours(path)):
        raise UserError(refusal)
