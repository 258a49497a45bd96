"""Host lists: Slurm's compact node lists and the deepspeed launcher's hostfile.

Slurm names the nodes of an allocation in a compact form (`SLURM_JOB_NODELIST=gpu[01-03,07],login1`);
`scontrol show hostnames` expands it. The same expansion is done here, so that `hrm-mega launch` can
pick the rendezvous host and write a deepspeed hostfile without scontrol on PATH.
"""

from __future__ import annotations

from hrm_mega.launch import LaunchError


def expand_hostlist(nodelist: str) -> list[str]:
    """Host names of a Slurm node list, in the order `scontrol show hostnames` prints them.

    "gpu[01-03,07],login1" -> gpu01 gpu02 gpu03 gpu07 login1; zero padding follows the lower bound;
    several bracket groups multiply: "r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip(), nodelist):
        hosts.extend(_expand_item(item, nodelist))
    if not hosts:
        raise LaunchError(f"node list {nodelist!r} names no hosts")
    return hosts


def deepspeed_hostfile(hosts: list[str], slots: int) -> str:
    """The deepspeed launcher's hostfile: one `HOST slots=N` line per node (N = processes per node)."""
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def _split_top_level(text: str, whole: str) -> list[str]:
    """Splits at commas outside brackets: "a[1,2],b" -> ["a[1,2]", "b"]."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise LaunchError(f"node list {whole!r}: unbalanced brackets")
    if depth:
        raise LaunchError(f"node list {whole!r}: unbalanced brackets")
    items.append(text[start:])
    if any(not item for item in items):
        raise LaunchError(f"node list {whole!r} has an empty entry")
    return items


def _expand_item(item: str, whole: str) -> list[str]:
    """Expands the first bracket group of one entry, then the rest of it recursively."""
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, ranges, rest = item[:open_at], item[open_at + 1 : close_at], item[close_at + 1 :]
    tails = _expand_item(rest, whole) if rest else [""]
    return [f"{prefix}{value}{tail}" for value in _expand_ranges(ranges, whole) for tail in tails]


def _expand_ranges(ranges: str, whole: str) -> list[str]:
    """ "01-03,07" -> 01 02 03 07."""
    values = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise LaunchError(f"node list {whole!r}: {part!r} is not a number or a range like 01-04")
        if hi and int(hi) < int(lo):
            raise LaunchError(f"node list {whole!r}: range {part!r} runs backwards")
        values += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi or lo) + 1)]
    return values
