#!/usr/bin/env bash
# Stage what a GPU host lacks for a campaign (studies/harness/gpu.sh): the pinned wheels of the sets named
# (wheels.txt: core, vllm, gptq) and the WikiText-2 files, as .stage/part-1..N, each small enough that it and the
# working tree fit one 64 MiB upload. Run from anywhere:
#   DATA=../shared/data bash studies/harness/stage.sh core model vllm
# DATA: the folder holding wikitext-2-raw/wiki.test.raw and wikitext-2/wiki.valid.tokens (checked on the host against
# the sha256 the project knows). SAVED: checkpoint folders saved quantized (studies/harness/compress.py), staged under
# /tmp/stage/data/saved/ on the host for precision `saved`. Each part is uploaded by one call that carries .stage/part-I and runs
# `bash studies/harness/gpu.sh unstage I`, one after another with nothing in between: the host keeps /tmp only while
# it is held.
set -euo pipefail
cd "$(dirname "$0")/../.."
sets=("$@"); [ ${#sets[@]} -gt 0 ] || sets=(core)
grep -qx '/.stage/' .git/info/exclude 2>/dev/null || echo '/.stage/' >> .git/info/exclude
rm -rf .stage/part-* .stage/payload; mkdir -p .stage/payload/wheels .stage/payload/data .stage/payload/deb .stage/cache
specs=$(awk -v want=" ${sets[*]} " '/^\[/{s=substr($0,2,length($0)-2); next} /^[^#]/ && index(want, " " s " ") {print}' \
  studies/harness/wheels.txt)
plat=(--platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any)
for spec in $specs; do
  case $spec in deb:*)  # a Debian package's files, unpacked on the host under /tmp/stage/deb
    ls .stage/cache | grep -q "^${spec#deb:}_.*\.deb$" || (cd .stage/cache && apt-get download -qq "${spec#deb:}" 2>/dev/null)
    continue ;; esac
  name=${spec#sdist:}; name=${name%%==*}
  if ls .stage/cache/ 2>/dev/null | grep -qi "^$(echo "$name" | tr - _)-${spec##*==}"; then continue; fi
  case $spec in sdist:*)  # built on the host
    python3 -m pip download -q --no-deps --no-binary="$name" -d .stage/cache "${spec#sdist:}"; continue ;; esac
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .stage/cache "$spec" 2>/dev/null \
  || python3 -m pip wheel -q --no-deps -w .stage/cache "$spec"
done
for spec in $specs; do
  case $spec in deb:*)
    f=$(ls .stage/cache | grep "^${spec#deb:}_.*\.deb$" | head -1)
    [ -n "$f" ] || { echo "missing: $spec" >&2; exit 1; }
    dpkg-deb -x ".stage/cache/$f" .stage/payload/deb; continue ;; esac
  spec=${spec#sdist:}
  f=$(ls .stage/cache | grep -i "^$(echo "${spec%%==*}" | tr - _)-${spec##*==}[-.]" | head -1)
  [ -n "$f" ] || { echo "missing: $spec" >&2; exit 1; }
  cp ".stage/cache/$f" .stage/payload/wheels/
done
data=${DATA:-../shared/data}
mkdir -p .stage/payload/data/wikitext-2-raw .stage/payload/data/wikitext-2
cp "$data/wikitext-2-raw/wiki.test.raw" .stage/payload/data/wikitext-2-raw/
cp "$data/wikitext-2/wiki.valid.tokens" .stage/payload/data/wikitext-2/
for f in ${SAVED:-}; do mkdir -p .stage/payload/data/saved && cp -r "$f" .stage/payload/data/saved/; done
tree=$({ git ls-files -z -co --exclude-standard | xargs -0 stat -c %s -- 2>/dev/null || true; } | awk '{s+=$1} END {print s+0}')
size=${PART_MB:-$((62 - (tree >> 20) - 1))}
tar -C .stage/payload -cf - . | split -b "${size}M" -d -a 2 - .stage/blob.
n=$(ls .stage/blob.* | wc -l); i=0
for f in $(ls .stage/blob.* | sort); do
  i=$((i + 1)); mkdir -p .stage/part-$i; mv "$f" .stage/part-$i/blob; echo "$n" > .stage/part-$i/total
done
rm -rf .stage/payload
echo "staged ${sets[*]}: $(du -sm .stage --exclude=cache | cut -f1) MiB in $n part(s) of ${size} MiB (the tree: $((tree >> 20)) MiB)"
