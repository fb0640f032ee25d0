# TEST DOUBLE for a NixOS system closure, built on the test host by tests/src/nix_cache.rs with
# Debian's Nix. This machine has no nixpkgs, so no real NixOS system can be built; what the
# installer does with a closure (download, unpack, register, set the profile) does not depend on
# what the files are, only on their number, sizes and references. This closure has those of a
# small NixOS system: a dozen store paths, about 350 MiB, tens of thousands of files, most of
# them small; data that compresses poorly (compressed kernel modules and firmware, images,
# machine code) and text that compresses well (scripts, man pages, locales); a symlink farm
# (system-path) and a top-level path that references everything, as
# `config.system.build.toplevel` does.
#
# Every derivation is built by a static busybox (Debian's busybox-static), which the caller puts
# beside this file as ./busybox/bin/busybox. Text is pseudo-random words from a seeded awk, so it
# compresses like text (3-4x), not like zeros; the poorly compressing data is /dev/urandom.
let
  system = "x86_64-linux";
  busybox = builtins.path { path = ./busybox; name = "busybox-static"; };

  # Shell functions the builders share. Sizes are bytes; file sizes are skewed towards the
  # small end (rand()^3), as in a real store.
  lib = ''
    # awk functions for pseudo-words: words(seed) makes the vocabulary, fill(path, size) writes
    # lines of it, the frequent words more often, as in prose.
    words_awk='
      function words(seed,   i, j, n, w) {
        srand(seed)
        for (i = 0; i < 3000; i++) {
          w = ""; n = 2 + int(rand() * 9)
          for (j = 0; j < n; j++) w = w sprintf("%c", 97 + int(rand() * 26))
          word[i] = w
        }
      }
      function fill(path, size,   s, j, n, line) {
        while (s < size) {
          line = ""; n = 4 + int(rand() * 12)
          for (j = 0; j < n; j++) line = line " " word[int(rand() * rand() * 3000)]
          print line > path; s += length(line) + 1
        }
        close(path)
      }'

    # text_file PATH SEED SIZE
    text_file() {
      mkdir -p "$(dirname "$1")"
      awk -v path="$1" -v seed="$2" -v size="$3" "$words_awk"' BEGIN { words(seed); fill(path, size) }'
    }

    # The sandbox has no /bin/sh for awk's system(), so directories are made before the files:
    # file F of DIR goes to DIR/subdir(F).
    subdir_awk='function subdir(f) { return "d" (f * 7919 % 23) "/e" (f * 104729 % 37) }'
    make_dirs() { # DIR COUNT
      awk -v dir="$1" -v count="$2" "$subdir_awk"' BEGIN { for (f = 0; f < count; f++) print dir "/" subdir(f) }' |
        sort -u | xargs mkdir -p
    }

    # text_files DIR SEED COUNT MIN MAX SUFFIX: COUNT text files in two levels of directories.
    text_files() {
      make_dirs "$1" "$3"
      awk -v dir="$1" -v seed="$2" -v count="$3" -v min="$4" -v max="$5" -v suffix="$6" \
        "$words_awk $subdir_awk"' BEGIN {
          words(seed)
          for (f = 0; f < count; f++)
            fill(dir "/" subdir(f) "/" word[int(rand() * 3000)] "-" f suffix, min + int(rand() * rand() * rand() * (max - min)))
        }'
    }

    # random_files DIR SEED COUNT MIN MAX SUFFIX: like text_files, with incompressible content.
    random_files() {
      make_dirs "$1" "$3"
      awk -v dir="$1" -v seed="$2" -v count="$3" -v min="$4" -v max="$5" -v suffix="$6" "$subdir_awk"' BEGIN {
          srand(seed)
          for (f = 0; f < count; f++)
            print dir "/" subdir(f) "/f" f suffix, min + int(rand() * rand() * rand() * (max - min))
        }' | while read -r path size; do head -c "$size" /dev/urandom > "$path"; done
    }

    # binary_file PATH SEED SIZE: like machine code, about half of it compressible.
    binary_file() {
      mkdir -p "$(dirname "$1")"
      head -c $(($3 / 2)) /dev/urandom > "$1"
      awk -v seed="$2" -v size=$(($3 - $3 / 2)) 'BEGIN {
        srand(seed)
        while (s < size) { line = sprintf("sym_%x_%x", int(rand() * 65536), int(rand() * 4096)); print line; s += length(line) + 1 }
      }' | head -c $(($3 - $3 / 2)) >> "$1"
    }

    # binary_files DIR SEED COUNT MIN MAX SUFFIX
    binary_files() {
      awk -v seed="$2" -v count="$3" -v min="$4" -v max="$5" 'BEGIN {
        srand(seed)
        for (f = 0; f < count; f++) print f, min + int(rand() * rand() * (max - min))
      }' | while read -r n size; do binary_file "$1/f$n$6" "$2$n" "$size"; done
    }
  '';

  package = name: script: derivation {
    inherit name system;
    builder = "${busybox}/bin/busybox";
    args = [ "sh" "-euc" ''
      mkdir -p "$TMPDIR/bin"
      ${busybox}/bin/busybox --install -s "$TMPDIR/bin"
      export PATH="$TMPDIR/bin"
      ${lib}
      mkdir -p "$out"
      ${script}
    '' ];
  };

  KiB = 1024;
  MiB = 1024 * 1024;
  str = toString;

  glibc = package "glibc-2.40-stand-in" ''
    binary_files $out/lib 11 12 ${str (1 * MiB)} ${str (5 * MiB)} .so
    text_files $out/share/locale 12 400 ${str (2 * KiB)} ${str (40 * KiB)} .mo
    text_files $out/share/i18n/locales 13 300 ${str (4 * KiB)} ${str (60 * KiB)} ""
  '';

  kernel = package "linux-6.12-stand-in" ''
    head -c ${str (13 * MiB)} /dev/urandom > $out/bzImage
    text_file $out/System.map 21 ${str (5 * MiB)}
  '';

  modules = package "linux-6.12-modules-stand-in" ''
    random_files $out/lib/modules/6.12.0/kernel 31 4500 ${str (2 * KiB)} ${str (90 * KiB)} .ko.xz
    text_files $out/lib/modules/6.12.0 32 6 ${str (100 * KiB)} ${str (600 * KiB)} .modules
  '';

  firmware = package "linux-firmware-stand-in" ''
    random_files $out/lib/firmware 41 700 ${str (4 * KiB)} ${str (900 * KiB)} .bin.zst
  '';

  initrd = package "initrd-linux-6.12-stand-in" ''
    head -c ${str (11 * MiB)} /dev/urandom > $out/initrd
  '';

  systemd = package "systemd-256-stand-in" ''
    binary_files $out/bin 51 60 ${str (40 * KiB)} ${str (600 * KiB)} ""
    binary_files $out/lib/systemd 52 80 ${str (100 * KiB)} ${str (900 * KiB)} ""
    text_files $out/share/man 53 600 ${str (2 * KiB)} ${str (30 * KiB)} .gz
    echo "${glibc}/lib/f0.so" > $out/lib/systemd/interpreter
  '';

  perl = package "perl-5.40-stand-in" ''
    binary_file $out/bin/perl 61 ${str (4 * MiB)}
    text_files $out/lib/perl5 62 2500 ${str (1 * KiB)} ${str (40 * KiB)} .pm
    echo "${glibc}/lib/f0.so" > $out/lib/perl5/interpreter
  '';

  python = package "python3-3.12-stand-in" ''
    binary_file $out/lib/libpython3.12.so 71 ${str (5 * MiB)}
    text_files $out/lib/python3.12 72 3000 ${str (1 * KiB)} ${str (40 * KiB)} .py
    binary_files $out/lib/python3.12/__pycache__ 73 1500 ${str (2 * KiB)} ${str (20 * KiB)} .pyc
    echo "${glibc}/lib/f0.so" > $out/lib/interpreter
  '';

  locales = package "glibc-locales-2.40-stand-in" ''
    text_file $out/lib/locale/locale-archive 81 ${str (30 * MiB)}
  '';

  manPages = package "man-pages-6.9-stand-in" ''
    text_files $out/share/man 91 5000 ${str (1 * KiB)} ${str (20 * KiB)} .gz
  '';

  icons = package "hicolor-icons-terminfo-stand-in" ''
    random_files $out/share/icons 101 6000 200 ${str (4 * KiB)} .png
    text_files $out/share/terminfo 102 2500 100 ${str (3 * KiB)} ""
  '';

  etc = package "etc-stand-in" ''
    text_files $out/etc 111 200 100 ${str (8 * KiB)} .conf
    ln -s ${systemd}/lib/systemd $out/etc/systemd-units
  '';

  packages = [ glibc systemd perl python locales manPages icons ];

  # Like NixOS's system-path (buildEnv): a farm of symlinks into the packages.
  systemPath = package "system-path-stand-in" ''
    for p in ${toString packages}; do
      (cd $p && find . -type f) | awk -v p=$p 'NR == 1 || NR % 8 == 0 { print p "/" substr($0, 3) }'
    done | while read -r target; do
      link=$out/$(echo "$target" | cut -d/ -f5-)
      mkdir -p "$(dirname "$link")"
      ln -s "$target" "$link"
    done
  '';

  # Like config.system.build.toplevel: small itself, it references the whole closure.
  toplevel = package "nixos-system-stand-in-25.05" ''
    ln -s ${kernel}/bzImage $out/kernel
    ln -s ${initrd}/initrd $out/initrd
    ln -s ${modules} $out/kernel-modules
    ln -s ${firmware} $out/firmware
    ln -s ${systemPath} $out/sw
    ln -s ${etc}/etc $out/etc
    printf '#!%s/bin/sh\nexec %s/lib/systemd/f0\n' ${busybox} ${systemd} > $out/init
    chmod +x $out/init
    echo stand-in > $out/nixos-version
    # What the installer runs in the target (nixos-enter), with an interpreter of the closure:
    # tests/stand-in/switch-to-configuration, the boot-loader stand-in.
    mkdir -p $out/bin
    { echo "#!${busybox}/bin/busybox sh"; cat ${./switch-to-configuration}; } > $out/bin/switch-to-configuration
    chmod 0555 $out/bin/switch-to-configuration
  '';

  # Built but never published: the store path a cache does not have.
  unpublished = package "nixos-system-unpublished-stand-in" ''
    echo "built on the test host, never copied to the cache" > $out/README
  '';
in
{
  inherit toplevel unpublished;
}
