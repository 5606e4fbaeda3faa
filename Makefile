# nixforge: two commands do everything on a fresh Debian 12 machine (as root):
#   make demo   forge the fixture system into an image and boot it
#   make test   every test, with the real judges
BUILD    ?= build
FIX      := $(BUILD)/fixtures
CARGO    ?= cargo
export NIXFORGE_FIXTURES := $(abspath $(FIX))
# systemd 254's sysupdate and bless-boot, unpacked from bookworm-backports
# (the judges of forge update, --slots 2 and the NixOS module's guard),
# never installed over the system's.
TOOLS    := $(BUILD)/tools
export NIXFORGE_SYSTEMD_TOOLS := $(abspath $(TOOLS)/systemd)

# One release build, static (glibc linked in): what `make install`
# installs, what the tests and the bench drive, and what runs inside the
# Nix sandbox (which holds only store paths). Its own target directory
# (--target), so RUSTFLAGS reach neither build scripts nor proc macros.
# Evaluated when used, after `deps`.
HOST_TRIPLE = $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
REL     = target/$(HOST_TRIPLE)/release
FORGE   = $(REL)/forge
RELEASE = RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --workspace --bins --target $(HOST_TRIPLE)
export NIXFORGE_RELEASE_DIR = $(abspath $(REL))
export NIXFORGE_STATIC_FORGE = $(abspath $(FORGE))

.PHONY: all deps fixtures tools build test-bins static install test test-unit test-boots test-flash fuzz demo bench bench-base bench-scaling lint clean

all: build

deps:
	scripts/deps.sh

# Fixture systems in real Nix stores; rebuilt when their scripts change.
$(FIX)/.stamp: fixtures/make-systems.sh fixtures/system.nix fixtures/stage1-init.sh | deps
	fixtures/make-systems.sh $(FIX)
	touch $@
fixtures: deps $(FIX)/.stamp

$(TOOLS)/systemd/lib/systemd/systemd-sysupdate: scripts/systemd-tools.sh | deps
	scripts/systemd-tools.sh $(TOOLS)/systemd
tools: deps $(TOOLS)/systemd/lib/systemd/systemd-sysupdate

build:
	$(RELEASE)

# The binaries the end-to-end tests drive: release builds with the test
# hooks (the NIXFORGE_*_PAUSE points tests interrupt at), which only a
# build with NIXFORGE_TEST_HOOKS=1 in its environment has (read by the
# binaries' own code, so cargo rebuilds just the two binaries, not the
# libraries), copied aside; $(REL) keeps the plain binaries `make
# build`, `make install` and Nix ship: the ones `build` made are put back
# (cargo, which saw the hooks' build last, rebuilds them on the next
# plain build, to the same bytes; copying saves a fresh clone's third
# link, 20 s).
TEST_BIN := target/test-hooks
test-bins: build
	mkdir -p $(TEST_BIN)/plain
	cp -f $(REL)/forge $(REL)/flash $(TEST_BIN)/plain/
	NIXFORGE_TEST_HOOKS=1 $(RELEASE)
	cp -f $(REL)/forge $(REL)/flash $(TEST_BIN)/
	cp -f $(TEST_BIN)/plain/forge $(TEST_BIN)/plain/flash $(REL)/

# The static forge the Nix sandbox tests run: the release build itself.
static: build

# forge and flash, their man pages and shell completions (bash, zsh, fish),
# under $(DESTDIR)$(PREFIX). Installs what `make build` built.
PREFIX  ?= /usr/local
DESTDIR ?=
BIN_DIR ?= $(REL)
install:
	@test -x $(BIN_DIR)/forge -a -x $(BIN_DIR)/flash || { echo "install: no binaries in $(BIN_DIR): run make build first" >&2; exit 1; }
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man1 \
	  $(DESTDIR)$(PREFIX)/share/bash-completion/completions \
	  $(DESTDIR)$(PREFIX)/share/zsh/site-functions \
	  $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
	for b in forge flash; do \
	  install -m 0755 $(BIN_DIR)/$$b $(DESTDIR)$(PREFIX)/bin/$$b && \
	  $(BIN_DIR)/$$b man $(DESTDIR)$(PREFIX)/share/man/man1 && \
	  $(BIN_DIR)/$$b completions bash > $(DESTDIR)$(PREFIX)/share/bash-completion/completions/$$b && \
	  $(BIN_DIR)/$$b completions zsh > $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_$$b && \
	  $(BIN_DIR)/$$b completions fish > $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/$$b.fish || exit 1; \
	done

# End-to-end tests drive the release binaries (debug ones are ~10x slower
# at hashing and writing). Two at a time, one per core: the e2e binary's
# 211 tests took 704-799 s so on this 2-core machine, busy 1.86 cores on
# average (880 s while the loop-device tests still ran one at a time).
test: deps fixtures tools test-bins
	NIXFORGE_BIN_DIR=$(abspath $(TEST_BIN)) $(CARGO) test --workspace -- --test-threads=2

# Parts of `make test` on their own. test-unit needs no root, no
# fixtures and no loop devices (the flash core runs on an in-memory disk).
test-unit:
	$(CARGO) test --workspace --lib
# The QEMU boots (OVMF, U-Boot).
test-boots: deps fixtures test-bins
	NIXFORGE_BIN_DIR=$(abspath $(TEST_BIN)) $(CARGO) test -p nixforge-tests -- --test-threads=2 boots
# flash on loop devices (root): writes, faults, kills, refusals.
test-flash: deps fixtures test-bins
	NIXFORGE_BIN_DIR=$(abspath $(TEST_BIN)) $(CARGO) test -p nixforge-tests --test e2e -- --test-threads=2 flash:: flash_safety:: trust::

# The parsers' property tests (tables, a device's own table, bmap, zstd
# frames, qcow2, ISO 9660, VHDX, FAT, PE/Authenticode, registration,
# bootspec; every test named *never_panic*) for FUZZ_SECS each, on a fresh
# seed (printed). `make test` runs them briefly with a fixed seed.
FUZZ_SECS ?= 120
fuzz:
	NIXFORGE_FUZZ_SECS=$(FUZZ_SECS) $(CARGO) test --workspace --lib never_panic -- --nocapture --test-threads=2

demo: deps fixtures build
	scripts/demo.sh $(FIX) $(BUILD)/demo

# The peer tools, and forge at BENCH_BASE alternated run by run with this
# tree: same bytes (every container, its bmap and layout manifest, on the
# fixtures and the corpus), no median or peak RSS more than 5 % worse.
# BENCH_BASE is the last commit whose outputs this tree must match byte
# for byte: a4478d6 (before the seams refactor; the dynamic VHD's bytes
# changed on purpose since, see BYTES_CHANGED in scripts/bench.py); move
# it when the bytes change on purpose. `make bench-base` runs only that
# comparison.
BENCH_BASE ?= a4478d6
# BENCH_ARGS: more options, e.g. "--throttle 400" (a disk-bound run on
# any machine) or "--only vm,info --runs 5".
bench: deps fixtures build
	scripts/bench.py $(BUILD)/bench --base $(BENCH_BASE) $(BENCH_ARGS)

bench-base: deps fixtures build
	scripts/bench.py $(BUILD)/bench --base $(BENCH_BASE) --only base

# forge ext4 on 0.5, 1, 2 and 4 GiB corpora: does time grow linearly?
bench-scaling: deps fixtures build
	scripts/bench.py $(BUILD)/bench --scaling

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	rm -rf $(BUILD)
	$(CARGO) clean
