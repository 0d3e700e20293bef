"""Turns a .cu file into C++ for the CUDA emulator (cuda_runtime.h beside this file).

Two rewrites, each checked to leave no CUDA-only syntax behind:
  kernel<<<grid, block, smem, stream>>>(args)   ->  ::qamw_emu::launch(kernel, grid, block, smem, stream)(args)
  extern __shared__ [__align__(n)] T name[];    ->  T* name = ::qamw_emu::dynamic_shared<T>();
A #line directive keeps compiler messages and __FILE__ pointing at the .cu file.

    python translate.py INPUT.cu OUTPUT.cpp
"""
import re
import sys

EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:]+(?:\s+[\w:]+)*)\s+(\w+)\s*\[\s*\]\s*;")


def callee_start(text: str, end: int) -> int:
    """Start of the kernel expression ending just before `end`: a name, qualified or not,
    with template arguments."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if i > 0 and text[i - 1] == ">":
        depth = 0
        while i > 0:
            i -= 1
            if text[i] == ">":
                depth += 1
            elif text[i] == "<":
                depth -= 1
                if depth == 0:
                    break
        else:
            raise ValueError("unbalanced template arguments before <<<")
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def translate(text: str) -> str:
    text = EXTERN_SHARED.sub(
        lambda m: f"{m.group(1)}* {m.group(2)} = ::qamw_emu::dynamic_shared<{m.group(1)}>();", text)
    out, pos = [], 0
    while (start := text.find("<<<", pos)) >= 0:
        stop = text.find(">>>", start)
        if stop < 0:
            raise ValueError("<<< without >>>")
        head = callee_start(text, start)
        kernel = text[head:start].strip()
        if not kernel:
            raise ValueError(f"no kernel name before <<< at offset {start}")
        out.append(text[pos:head])
        out.append(f"::qamw_emu::launch({kernel}, {text[start + 3:stop].strip()})")
        pos = stop + 3
    out.append(text[pos:])
    result = "".join(out)
    for leftover in ("<<<", ">>>", "extern __shared__"):
        if leftover in result:
            raise ValueError(f"untranslated {leftover!r}")
    return result


def main() -> None:
    source, target = sys.argv[1], sys.argv[2]
    with open(source) as f:
        text = f.read()
    with open(target, "w") as f:
        f.write(f'#line 1 "{source}"\n' + translate(text))


if __name__ == "__main__":
    main()
