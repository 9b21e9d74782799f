"""A git checkout whose files are written out only when read, and commits made with
plumbing. `apply --onto` makes its verdicts in one (stackbuild.onto); a workspace
applies its series in one and writes out the rest of the files once at the end
(stackbuild.workspace). Writing out 4,500 files to change two is most of the cost of
a checkout, and every index write after a checkout made within the same second
re-reads and re-hashes all of them (git's racy-clean check): a tree whose index holds
no stat data has nothing to re-check."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from pathlib import Path

from stackbuild.errors import SourceError
from stackbuild.gitrun import git_process, run_git
from stackbuild.treewrite import Tree, TreeWriteError


def commit_files(tree: Path, files: Sequence[str], message: str, parent: str,
                 env: Mapping[str, str] | None = None) -> str:
    """Stage `files` (added, changed or deleted) and make a commit of the index on top
    of `parent`; no ref moves. Plumbing, not `git commit`: commit refreshes the stat
    data of every file in the index (re-hashing a whole tree checked out within the
    same second) and runs auto-maintenance, neither of which a commit of two changed
    files needs. The message is cleaned as `git commit -m` cleans it, so the commit
    ids are those `git commit` gave."""
    # literal: a file named `*.py` or `:(top)x` is that file, not a pattern
    run_git(tree, "--literal-pathspecs", "add", "-A", "-f", "--", *files, env=env)
    tree_id = run_git(tree, "write-tree", env=env)
    return run_git(tree, "commit-tree", tree_id, "-p", parent, "-m", stripspace(message), env=env)


def stripspace(message: str) -> str:
    """`git stripspace` (what `git commit -m` applies): trailing whitespace off every
    line, runs of empty lines made one, none at either end, a newline after the last."""
    lines: list[str] = []
    gap = False
    for line in message.split("\n"):
        line = line.rstrip(" \t\r")  # git's isspace: no \v or \f
        if not line:
            gap = bool(lines)
            continue
        if gap:
            lines.append("")
            gap = False
        lines.append(line)
    return "".join(f"{x}\n" for x in lines)


class SparseTree:
    """A checkout whose index holds every file of `head` (read-tree, no stat data) but
    whose folder holds only the files the series reads. Every read of the tree door
    asks `fill` first, which brings the file in (`git checkout-index`) when HEAD has
    it, so a patch sees exactly what a full checkout would show. Symbolic links and
    .gitattributes files are written out up front: the door resolves links in folder
    names, and git reads attributes from them. A commit records the index, so files
    never brought in stay as HEAD has them. No ref moves: `tip` is the last commit."""

    def __init__(self, path: Path, head: str, env: Mapping[str, str] | None = None):
        self.path = path
        self.env = env
        self.tip = head
        self.door = Tree(path)
        self.brought: set[str] = set()
        self.committed: set[str] = set()  # paths a commit staged (changed, added or deleted)
        self.in_head: set[str] = set()
        up_front = []
        for e in run_git(path, "ls-files", "-s", "-z", env=env, error=SourceError).split("\0"):
            meta, _, rel = e.partition("\t")
            if rel:
                self.in_head.add(rel)
                if meta.startswith("120000 ") or rel == ".gitattributes" or rel.endswith("/.gitattributes"):
                    up_front.append(rel)
        self.sorted = sorted(self.in_head)  # a folder's files follow its name + "/"
        self._checkout(up_front)

    def commit(self, files: Sequence[str], message: str) -> str:
        self.tip = commit_files(self.path, files, message, self.tip, env=self.env)
        self.committed.update(files)
        return self.tip

    def write_out_rest(self) -> None:
        """Every file of HEAD that no commit staged, written out with its stat data
        recorded (`checkout-index -u`): the checkout is then whole, and clean."""
        todo = [p for p in self.sorted if p not in self.committed]
        if todo:
            self._run_checkout(todo, "-u")
        self.brought.update(todo)

    def _checkout(self, paths: Sequence[str]) -> None:
        todo = [p for p in paths if p not in self.brought]
        if todo:
            self.brought.update(todo)
            self._run_checkout(todo)

    def _run_checkout(self, paths: Sequence[str], *flags: str) -> None:
        r = git_process(self.path, "checkout-index", "-f", *flags, "-z", "--stdin", stdin="\0".join(paths) + "\0",
                        env=self.env)
        if r.returncode != 0:
            raise SourceError(f"cannot check out {', '.join(paths[:5])}: {r.stderr.strip()[-300:]}", file=self.path)

    def _a_file_in(self, folder: str) -> str | None:
        """One file of HEAD under `folder`, when HEAD has that folder."""
        i = bisect.bisect_left(self.sorted, folder + "/")
        return self.sorted[i] if i < len(self.sorted) and self.sorted[i].startswith(folder + "/") else None

    def fill(self, rel: str) -> None:
        try:
            real = self.door.real_path(rel)
        except TreeWriteError:
            return  # the door refuses the path itself when it is read
        # the file, a file of HEAD standing where the path needs a folder, and a file
        # of the folder HEAD has where the path names a file: the door then sees what
        # a full checkout would show it ("is a file, not a folder", "it is a folder")
        parts = real.split("/")
        wanted = [p for p in ("/".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in self.in_head]
        inside = self._a_file_in(real)
        if inside is not None:
            wanted.append(inside)
        self._checkout(wanted)
