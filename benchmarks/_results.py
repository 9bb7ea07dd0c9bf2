"""benchmarks/RESULTS.md: each benchmark script owns one '## ' section and rewrites it."""
from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _cpuinfo() -> tuple[str, set]:
    """(model name, instruction-set flags) of the first CPU in /proc/cpuinfo."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return name, flags


def machine() -> str:
    import torch
    return (f"{_cpuinfo()[0]}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {datetime.date.today().isoformat()}")


def cpu_kind() -> str:
    """The CPU kind a figure belongs to, e.g. "AMD EPYC (AVX-512 BF16, no AMX)": the engine's
    bf16 speed depends on whether oneDNN has AMX tiles, AVX-512 BF16 or neither, so engine
    sections keep one table per kind (the kind is in the section title)."""
    name, flags = _cpuinfo()
    family = next((f for f in ("EPYC", "Ryzen", "Xeon", "Core") if f in name), None)
    vendor = "AMD" if "AMD" in name else "Intel" if "Intel" in name else ""
    label = f"{vendor} {family}".strip() if family else name
    isa = ["AMX" if "amx_tile" in flags else "no AMX"]
    if "avx512_bf16" in flags:
        isa.insert(0, "AVX-512 BF16")
    elif "avx512f" in flags:
        isa.insert(0, "AVX-512")
    elif "avx2" in flags:
        isa.insert(0, "AVX2")
    return f"{label} ({', '.join(isa)})"


def header(argv: list[str]) -> str:
    """The lines every section starts with: the command that wrote it, the machine, the load."""
    cmd = " ".join(["python", f"benchmarks/{Path(argv[0]).name}", *argv[1:]])
    return f"Command: `{cmd}`  \nMachine: {machine()}; load average at the end {os.getloadavg()[0]:.1f}  \n"


def write_section(title: str, text: str, path: Path = RESULTS) -> Path:
    """Replace (or append) the section whose heading is `title` ('## ...') with `text`."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = text.rstrip("\n") + "\n\n"
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)
    return path
