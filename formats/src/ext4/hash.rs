//! The directory-index name hash: half-MD4 with the filesystem's hash
//! seed, names read as *signed* bytes. The superblock says so with
//! EXT2_FLAGS_SIGNED_HASH (the kernel and e2fsck honour either flag); we
//! pick signed because it is what mkfs writes on x86 and so what most
//! filesystems carry, and some readers (ext4-view 1.0) assume it.

const K2: u32 = 0x5A82_7999;
const K3: u32 = 0x6ED9_EBA1;

fn f(x: u32, y: u32, z: u32) -> u32 {
    z ^ (x & (y ^ z))
}
fn g(x: u32, y: u32, z: u32) -> u32 {
    (x & y).wrapping_add((x ^ y) & z)
}
fn h(x: u32, y: u32, z: u32) -> u32 {
    x ^ y ^ z
}

fn transform(buf: &mut [u32; 4], inp: &[u32; 8]) {
    let [mut a, mut b, mut c, mut d] = *buf;
    macro_rules! round {
        ($f:ident, $a:ident, $b:ident, $c:ident, $d:ident, $x:expr, $s:expr) => {
            $a = $a
                .wrapping_add($f($b, $c, $d))
                .wrapping_add($x)
                .rotate_left($s);
        };
    }
    round!(f, a, b, c, d, inp[0], 3);
    round!(f, d, a, b, c, inp[1], 7);
    round!(f, c, d, a, b, inp[2], 11);
    round!(f, b, c, d, a, inp[3], 19);
    round!(f, a, b, c, d, inp[4], 3);
    round!(f, d, a, b, c, inp[5], 7);
    round!(f, c, d, a, b, inp[6], 11);
    round!(f, b, c, d, a, inp[7], 19);

    round!(g, a, b, c, d, inp[1].wrapping_add(K2), 3);
    round!(g, d, a, b, c, inp[3].wrapping_add(K2), 5);
    round!(g, c, d, a, b, inp[5].wrapping_add(K2), 9);
    round!(g, b, c, d, a, inp[7].wrapping_add(K2), 13);
    round!(g, a, b, c, d, inp[0].wrapping_add(K2), 3);
    round!(g, d, a, b, c, inp[2].wrapping_add(K2), 5);
    round!(g, c, d, a, b, inp[4].wrapping_add(K2), 9);
    round!(g, b, c, d, a, inp[6].wrapping_add(K2), 13);

    round!(h, a, b, c, d, inp[3].wrapping_add(K3), 3);
    round!(h, d, a, b, c, inp[7].wrapping_add(K3), 9);
    round!(h, c, d, a, b, inp[2].wrapping_add(K3), 11);
    round!(h, b, c, d, a, inp[6].wrapping_add(K3), 15);
    round!(h, a, b, c, d, inp[1].wrapping_add(K3), 3);
    round!(h, d, a, b, c, inp[5].wrapping_add(K3), 9);
    round!(h, c, d, a, b, inp[0].wrapping_add(K3), 11);
    round!(h, b, c, d, a, inp[4].wrapping_add(K3), 15);

    buf[0] = buf[0].wrapping_add(a);
    buf[1] = buf[1].wrapping_add(b);
    buf[2] = buf[2].wrapping_add(c);
    buf[3] = buf[3].wrapping_add(d);
}

/// Pack up to 32 name bytes into eight words, padded with a length pattern.
fn str2hashbuf(msg: &[u8], len: usize, out: &mut [u32; 8]) {
    let mut pad = (len as u32) | ((len as u32) << 8);
    pad |= pad << 16;
    let mut val = pad;
    let take = len.min(32);
    let mut i_out = 0;
    for (i, &c) in msg[..take].iter().enumerate() {
        // Sign-extended, as the kernel's str2hashbuf_signed.
        val = (c as i8 as i32 as u32).wrapping_add(val << 8);
        if i % 4 == 3 {
            out[i_out] = val;
            i_out += 1;
            val = pad;
        }
    }
    if i_out < 8 {
        out[i_out] = val;
        i_out += 1;
    }
    while i_out < 8 {
        out[i_out] = pad;
        i_out += 1;
    }
}

/// (major hash with the low bit clear, minor hash)
pub fn half_md4(name: &[u8], seed: &[u32; 4]) -> (u32, u32) {
    let mut buf = if seed.iter().any(|&s| s != 0) {
        *seed
    } else {
        [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476]
    };
    let mut p = name;
    let mut len = name.len();
    let mut inp = [0u32; 8];
    loop {
        str2hashbuf(p, len, &mut inp);
        transform(&mut buf, &inp);
        if len <= 32 {
            break;
        }
        len -= 32;
        p = &p[32..];
    }
    let mut hash = buf[1] & !1;
    // 0x7fffffff << 1 is reserved as the end-of-directory marker.
    if hash == 0x7fff_ffff << 1 {
        hash = (0x7fff_ffff - 1) << 1;
    }
    (hash, buf[2])
}
