//! `flash station` (issue 28): started under tmux, then loop devices are
//! attached one after another; each new one gets the next identity, one
//! attached read-only is refused and reported, one present before the
//! start is never written, the screen shows a row per card, and the
//! report a JSON line per card. A second station with the same report
//! skips a finished card plugged back in and gives the next card the
//! next identity.

use nixforge_tests::flashing::*;
use nixforge_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Wait until `f` holds (up to two minutes), or fail with `what`.
fn until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn report_lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_station_flashes_each_new_card_with_the_next_identity_and_never_one_present_at_the_start() {
    let _g = exclusive();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let img = small_raw_efi(dir);
    let size = len(&img);
    for id in ["a", "b", "c", "d"] {
        std::fs::create_dir_all(dir.join("ids").join(id)).unwrap();
        std::fs::write(
            dir.join("ids").join(id).join("hostname"),
            format!("pi-{id}\n"),
        )
        .unwrap();
    }
    let cards: Vec<_> = (0..6).map(|i| dir.join(format!("card{i}"))).collect();
    for c in &cards {
        stale_file(c, size);
    }
    let stale = sha256_file(&cards[0]);
    let report = dir.join("report.jsonl");
    let station = |extra: &str| {
        format!(
            "{} station {} --identities {} --match 'loop:{}/card*' --report {} --yes --allow-non-removable {extra}",
            bin("flash").display(),
            img.display(),
            dir.join("ids").display(),
            dir.display(),
            report.display()
        )
    };
    // Present before the start: never written.
    let before = Loop::attach(&cards[0], &[]);
    let t = Tmux::start(
        &format!("station-{}", std::process::id()),
        &format!("{}; sleep 600", station("--count 3")),
    );
    until("the station to wait", || t.screen().contains("waiting for"));
    let l1 = Loop::attach(&cards[1], &[]);
    until("card 1", || report_lines(&report).len() == 1);
    let l2 = Loop::attach(&cards[2], &["-r"]);
    until("the read-only card", || report_lines(&report).len() == 2);
    let l3 = Loop::attach(&cards[3], &[]);
    let l4 = Loop::attach(&cards[4], &[]);
    until("cards 3 and 4", || report_lines(&report).len() == 4);
    until("the station to stop after 3", || {
        t.screen().contains("3 cards written")
    });
    let r = report_lines(&report);
    let by_dev = |dev: &str| {
        r.iter()
            .find(|v| v["device"] == dev)
            .unwrap_or_else(|| panic!("{dev}: {r:?}"))
    };
    let written: Vec<String> = [&l1, &l3, &l4]
        .iter()
        .map(|l| {
            let v = by_dev(&l.dev);
            assert_eq!(v["ok"], true, "{v}");
            assert!(v["machine_id"].is_string(), "{v}");
            // The image, checked once at the start: its bmap's SHA-256.
            assert_eq!(
                v["image"]["bmap_sha256"].as_str().map(str::len),
                Some(64),
                "{v}"
            );
            v["identity"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    // Each its own identity, in name order (l3 and l4 race for b and c).
    assert_eq!(written[0], "a", "{r:?}");
    let mut rest = written[1..].to_vec();
    rest.sort();
    assert_eq!(rest, ["b", "c"], "{r:?}");
    let ro = by_dev(&l2.dev);
    assert!(ro["ok"] == false && ro["refused"] == true, "{ro}");
    assert!(ro["error"].as_str().unwrap().contains("writable"), "{ro}");
    assert_eq!(
        sha256_file(&cards[2]),
        stale,
        "the read-only card was written"
    );
    assert_eq!(
        sha256_file(&cards[0]),
        stale,
        "a device present at the start was written"
    );
    // A row per written card on the screen: device, identity, done.
    let screen = t.screen();
    for (l, id) in [&l1, &l3, &l4].iter().zip(&written) {
        assert!(
            screen.lines().any(|row| {
                let w: Vec<&str> = row.split_whitespace().collect();
                w.len() > 3 && w[0] == l.dev && w[1] == id && w.last() == Some(&"done")
            }),
            "{}: {screen}",
            l.dev
        );
    }
    drop((l2, l3, l4, before));
    // The finished card 1 plugged back in (a new loop device, the same
    // backing file) is skipped; the next new card gets identity d.
    drop(l1);
    a_second_station_skips_a_finished_card(dir, &station("--count 1"), &report, &cards);
}

#[test]
fn ctrl_c_stops_the_station_and_the_card_in_flight_is_left_with_no_table() {
    let _g = exclusive();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let img = small_raw_efi(dir);
    std::fs::create_dir_all(dir.join("ids/a")).unwrap();
    // The card holds a whole image (a valid table) before the station
    // starts on it.
    let card = dir.join("card1");
    std::fs::copy(&img, &card).unwrap();
    // A missing image stops the station before it waits: exit 2.
    let o = flash()
        .arg("station")
        .arg(dir.join("gone.img"))
        .arg("--identities")
        .arg(dir.join("ids"))
        .arg("--yes")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("gone.img") && !err.contains("waiting"),
        "{err}"
    );
    let log = dir.join("station.log");
    let mut child = flash()
        .arg("station")
        .arg(&img)
        .arg("--identities")
        .arg(dir.join("ids"))
        .arg("--match")
        .arg(format!("loop:{}/card*", dir.display()))
        .args(["--yes", "--allow-non-removable"])
        .env("NIXFORGE_FLASH_PAUSE", "body")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    until("the station to wait", || read().contains("waiting for"));
    let lo = Loop::attach(&card, &[]);
    // Held after its old tables are zeroed, the first write done.
    until("the card to be held mid-write", || {
        read().contains("paused at body")
    });
    ok(Command::new("kill").args(["-INT", &child.id().to_string()]));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{}", read());
    drop(lo);
    assert!(no_table_left(&card), "a table survived: {}", read());
}

/// A second station on the same report: card 1 plugged back in (a new
/// loop device, the same backing file) is skipped; the next new card
/// gets the next identity, d; no escape codes without a terminal.
fn a_second_station_skips_a_finished_card(
    dir: &Path,
    station: &str,
    report: &Path,
    cards: &[PathBuf],
) {
    let log = dir.join("station2.log");
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!("{} 2> {}", station, log.display()))
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    until("the second station to wait", || {
        read().contains("waiting for")
    });
    let again = Loop::attach(&cards[1], &[]);
    until("card 1 again", || report_lines(report).len() == 5);
    let fifth = Loop::attach(&cards[5], &[]);
    until("card 5", || report_lines(report).len() == 6);
    assert!(child.wait().unwrap().success(), "{}", read());
    let r = report_lines(report);
    assert!(
        r[4]["device"] == again.dev.as_str()
            && r[4]["skipped"]
                .as_str()
                .unwrap()
                .contains("already provisioned"),
        "{r:?}"
    );
    assert!(
        r[5]["device"] == fifth.dev.as_str() && r[5]["ok"] == true,
        "{r:?}"
    );
    assert!(r[5]["identity"].as_str().unwrap().ends_with("/d"), "{r:?}");
    assert!(
        !read().contains('\u{1b}'),
        "escape codes without a terminal: {}",
        read()
    );
}
