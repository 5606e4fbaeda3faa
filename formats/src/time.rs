//! Calendar dates of Unix times, for the formats that store them as dates
//! (FAT) and the text that shows them (boot entries).

/// (year, month 1–12, day 1–31, seconds into the day) of a Unix time, UTC.
/// Howard Hinnant's days-to-civil algorithm.
pub fn civil(unix: i64) -> (i64, u32, u32, u32) {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400) as u32;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d, secs)
}

/// Every timestamp an image or a device's own filesystem holds:
/// `SOURCE_DATE_EPOCH` (the reproducible-builds convention), or 1 as in
/// the Nix store when it is not set. A value that is not a number of
/// seconds (fitting 32 bits) is an error, never silently 1.
pub fn source_date_epoch() -> Result<u32, String> {
    epoch_from(std::env::var("SOURCE_DATE_EPOCH").ok().as_deref())
}

fn epoch_from(v: Option<&str>) -> Result<u32, String> {
    match v {
        None => Ok(1),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn source_date_epoch_is_a_number_or_unset() {
        assert_eq!(super::epoch_from(None), Ok(1));
        assert_eq!(super::epoch_from(Some(" 1700000000\n")), Ok(1_700_000_000));
        for bad in ["", "yesterday", "-1", "99999999999"] {
            assert!(super::epoch_from(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn known_dates() {
        assert_eq!(super::civil(0), (1970, 1, 1, 0));
        assert_eq!(super::civil(951_782_400), (2000, 2, 29, 0));
        assert_eq!(super::civil(1_700_000_000), (2023, 11, 14, 80_000));
    }
}
