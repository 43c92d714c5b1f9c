//! Which servers hold a key.
//!
//! Readers of the cache (pylibmc, python-memcached, pymemcache's
//! `HashClient`, Django's backends over them) each spread keys over servers
//! their own way, and a reader looks a key up on one server only. So
//! tailcache places each key exactly where the readers' client looks for
//! it, bit for bit (`memcached.distribution`, [`Distribution`]):
//!
//! | distribution | client | algorithm |
//! |---|---|---|
//! | `all` | any | every key on every server |
//! | `modula` | python-memcached (default) | `cmemcache_hash(key)` = `((crc32(key) >> 16) & 0x7fff) or 1`, modulo the server list in which each server appears `weight` times |
//! | `ketama` | pylibmc `behaviors={"ketama": True}` (libmemcached `MEMCACHED_BEHAVIOR_KETAMA`) | continuum of 100 points per server, point *i* = one-at-a-time(`"host:port-i"`, or `"host-i"` on port 11211); key → one-at-a-time(key), first point ≥ it (wrapping) |
//! | `ketama_weighted` | pylibmc `behaviors={"ketama_weighted": True}` | MD5; each server gets `floor(weight/total × 40 × n) × 4` points, 4 per MD5 of `"host:port-i"`; key → first 4 bytes of MD5(key), little-endian |
//! | `rendezvous` | pymemcache `HashClient` (default), Django `PyMemcacheCache` | highest murmur3_32(`"host:port-key"`, seed 0) wins; ties go to the greater node name |
//! | `pylibmc` | pylibmc without behaviors (libmemcached modula) | one-at-a-time(key) modulo the number of servers |
//!
//! Server names are formatted as the client formats them: `host:port` with
//! the host as written in `memcached.servers` (IPv6 brackets removed, as
//! pymemcache and pylibmc remove them). Keys are hashed as the bytes the
//! client sends (UTF-8); pymemcache hashes the characters of a `str` key
//! (code point & 0xff), which for ASCII keys — the only ones its clients
//! accept by default — is the same.
//!
//! A server that is down keeps its keys: no placement ever moves a key to
//! another server (the clients' failover rehashing is not followed, so a
//! reader and tailcache never disagree about a key's home).

use crate::config::{Distribution, MemcachedConfig};

/// Picks the servers that must hold a key.
pub trait Placement: Send + Sync + 'static {
    /// Pushes onto `out` the indices (into `servers`, in configuration
    /// order) of the servers that must hold `key`.
    fn place(&self, key: &[u8], servers: &[String], out: &mut Vec<usize>);
}

/// Every key on every server.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllServers;

impl Placement for AllServers {
    fn place(&self, _key: &[u8], servers: &[String], out: &mut Vec<usize>) {
        out.extend(0..servers.len());
    }
}

/// The placement `mc.distribution` names, over `mc.servers` (and weights).
pub fn for_config(mc: &MemcachedConfig) -> Box<dyn Placement> {
    let weights: Vec<u32> = (0..mc.servers.len()).map(|i| mc.weight(i)).collect();
    match mc.distribution {
        Distribution::All => Box::new(AllServers),
        Distribution::Modula => Box::new(Modula::new(&weights)),
        Distribution::Ketama => Box::new(Ketama::new(&mc.servers)),
        Distribution::KetamaWeighted => Box::new(Ketama::weighted(&mc.servers, &weights)),
        Distribution::Rendezvous => Box::new(Rendezvous::new(&mc.servers)),
        Distribution::Pylibmc => Box::new(PylibmcModula),
    }
}

/// `host` and `port` of a `HOST:PORT` (or `[V6]:PORT`) server string.
pub fn split_server(server: &str) -> (&str, u16) {
    match server.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() && !server.ends_with(']') => {
            let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
            (host, port.parse().unwrap_or(11211))
        }
        _ => (server.trim_start_matches('[').trim_end_matches(']'), 11211),
    }
}

// ---------------------------------------------------------------------------
// python-memcached
// ---------------------------------------------------------------------------

/// CRC-32 (IEEE 802.3, as zlib and Python's `binascii.crc32`).
pub fn crc32(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    static TABLE: [u32; 256] = table();
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// python-memcached's `cmemcache_hash`.
pub fn cmemcache_hash(key: &[u8]) -> u32 {
    match (crc32(key) >> 16) & 0x7fff {
        0 => 1,
        h => h,
    }
}

/// python-memcached's default: `buckets[cmemcache_hash(key) % len(buckets)]`,
/// each server `weight` times in `buckets`.
#[derive(Debug, Clone)]
pub struct Modula {
    buckets: Vec<usize>,
}

impl Modula {
    pub fn new(weights: &[u32]) -> Modula {
        Modula { buckets: weights.iter().enumerate().flat_map(|(i, &w)| std::iter::repeat_n(i, w as usize)).collect() }
    }
}

impl Placement for Modula {
    fn place(&self, key: &[u8], _servers: &[String], out: &mut Vec<usize>) {
        if !self.buckets.is_empty() {
            out.push(self.buckets[cmemcache_hash(key) as usize % self.buckets.len()]);
        }
    }
}

// ---------------------------------------------------------------------------
// libmemcached (pylibmc)
// ---------------------------------------------------------------------------

/// libhashkit's one-at-a-time hash (its default), over `char` as signed
/// (x86): bytes ≥ 0x80 are sign-extended, as libmemcached does.
pub fn one_at_a_time(key: &[u8]) -> u32 {
    let mut v: u32 = 0;
    for &b in key {
        v = v.wrapping_add(b as i8 as i32 as u32);
        v = v.wrapping_add(v << 10);
        v ^= v >> 6;
    }
    v = v.wrapping_add(v << 3);
    v ^= v >> 11;
    v.wrapping_add(v << 15)
}

/// libmemcached's ketama continuum; see the module docs.
#[derive(Debug, Clone)]
pub struct Ketama {
    /// (point, server index), sorted.
    points: Vec<(u32, usize)>,
    weighted: bool,
}

/// libmemcached's `MEMCACHED_POINTS_PER_SERVER`.
const POINTS_PER_SERVER: u32 = 100;
/// libmemcached's `MEMCACHED_POINTS_PER_SERVER_KETAMA`.
const POINTS_PER_SERVER_KETAMA: u32 = 160;

fn ketama_point_name(server: &str, i: u32) -> String {
    let (host, port) = split_server(server);
    if port == 11211 { format!("{host}-{i}") } else { format!("{host}:{port}-{i}") }
}

impl Ketama {
    /// `behaviors={"ketama": True}`.
    pub fn new(servers: &[String]) -> Ketama {
        let mut points = Vec::with_capacity(servers.len() * POINTS_PER_SERVER as usize);
        for (s, server) in servers.iter().enumerate() {
            for i in 0..POINTS_PER_SERVER {
                points.push((one_at_a_time(ketama_point_name(server, i).as_bytes()), s));
            }
        }
        points.sort_unstable();
        Ketama { points, weighted: false }
    }

    /// `behaviors={"ketama_weighted": True}`, with server weights.
    pub fn weighted(servers: &[String], weights: &[u32]) -> Ketama {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let live = servers.len() as f32;
        let mut points = Vec::new();
        for (s, server) in servers.iter().enumerate() {
            // The same float arithmetic as update_continuum().
            let pct = weights.get(s).copied().unwrap_or(1) as f32 / total.max(1) as f32;
            let per_server =
                ((pct * POINTS_PER_SERVER_KETAMA as f32 / 4.0 * live + 0.000_000_000_1_f32).floor() as u32) * 4;
            for i in 0..per_server / 4 {
                let digest = md5(ketama_point_name(server, i).as_bytes());
                for x in 0..4 {
                    let v =
                        u32::from_le_bytes([digest[4 * x], digest[4 * x + 1], digest[4 * x + 2], digest[4 * x + 3]]);
                    points.push((v, s));
                }
            }
        }
        points.sort_unstable();
        Ketama { points, weighted: true }
    }

    fn key_hash(&self, key: &[u8]) -> u32 {
        if self.weighted {
            let d = md5(key);
            u32::from_le_bytes([d[0], d[1], d[2], d[3]])
        } else {
            one_at_a_time(key)
        }
    }
}

impl Placement for Ketama {
    fn place(&self, key: &[u8], servers: &[String], out: &mut Vec<usize>) {
        if servers.len() == 1 {
            // libmemcached skips hashing with one server.
            out.push(0);
            return;
        }
        if self.points.is_empty() {
            return;
        }
        let h = self.key_hash(key);
        let at = self.points.partition_point(|&(v, _)| v < h);
        let at = if at == self.points.len() { 0 } else { at };
        out.push(self.points[at].1);
    }
}

/// pylibmc's default: libmemcached modula, one-at-a-time hash.
#[derive(Debug, Clone, Copy, Default)]
pub struct PylibmcModula;

impl Placement for PylibmcModula {
    fn place(&self, key: &[u8], servers: &[String], out: &mut Vec<usize>) {
        match servers.len() {
            0 => {}
            1 => out.push(0),
            n => out.push(one_at_a_time(key) as usize % n),
        }
    }
}

// ---------------------------------------------------------------------------
// pymemcache
// ---------------------------------------------------------------------------

/// pymemcache's `murmur3_32(data, seed=0)` over a sequence of byte values.
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h1 = seed;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k1 = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k1 = k1.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h1 ^= k1;
        h1 = h1.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut k1 = 0u32;
        for (i, &b) in tail.iter().enumerate() {
            k1 |= (b as u32) << (8 * i);
        }
        k1 = k1.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h1 ^= k1;
    }
    h1 ^= data.len() as u32;
    h1 ^= h1 >> 16;
    h1 = h1.wrapping_mul(0x85eb_ca6b);
    h1 ^= h1 >> 13;
    h1 = h1.wrapping_mul(0xc2b2_ae35);
    h1 ^ (h1 >> 16)
}

/// pymemcache `HashClient`'s `RendezvousHash`: node names `host:port`.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    /// Each node's name followed by `-`, as code-point bytes.
    prefixes: Vec<Vec<u8>>,
    names: Vec<String>,
}

/// The characters of `s` as pymemcache's murmur3 reads them (`ord(c) & 0xff`).
fn char_bytes(s: &str, out: &mut Vec<u8>) {
    out.extend(s.chars().map(|c| (c as u32 & 0xff) as u8));
}

impl Rendezvous {
    pub fn new(servers: &[String]) -> Rendezvous {
        let names: Vec<String> = servers
            .iter()
            .map(|s| {
                let (host, port) = split_server(s);
                format!("{host}:{port}")
            })
            .collect();
        let prefixes = names
            .iter()
            .map(|n| {
                let mut b = Vec::new();
                char_bytes(n, &mut b);
                b.push(b'-');
                b
            })
            .collect();
        Rendezvous { prefixes, names }
    }

    /// The node names, as pymemcache formats them.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

impl Placement for Rendezvous {
    fn place(&self, key: &[u8], _servers: &[String], out: &mut Vec<usize>) {
        let key = String::from_utf8_lossy(key);
        let mut buf = Vec::with_capacity(64);
        let mut best: Option<(u32, usize)> = None;
        for (i, prefix) in self.prefixes.iter().enumerate() {
            buf.clear();
            buf.extend_from_slice(prefix);
            char_bytes(&key, &mut buf);
            let score = murmur3_32(&buf, 0);
            best = match best {
                None => Some((score, i)),
                Some((s, _)) if score > s => Some((score, i)),
                // A tie goes to the greater name (`max(str(node), str(winner))`).
                Some((s, w)) if score == s && self.names[i] > self.names[w] => Some((score, i)),
                b => b,
            };
        }
        if let Some((_, i)) = best {
            out.push(i);
        }
    }
}

// ---------------------------------------------------------------------------
// MD5 (RFC 1321), for libmemcached's weighted ketama
// ---------------------------------------------------------------------------

/// MD5 digest of `input`.
pub fn md5(input: &[u8]) -> [u8; 16] {
    const S: [u32; 64] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14,
        20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6,
        10, 15, 21,
    ];
    let k: [u32; 64] = std::array::from_fn(|i| ((i as f64 + 1.0).sin().abs() * 4_294_967_296.0) as u32);
    let mut state: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
    let mut msg = input.to_vec();
    let bit_len = (input.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_le_bytes());
    for block in msg.chunks_exact(64) {
        let m: [u32; 16] = std::array::from_fn(|i| {
            u32::from_le_bytes([block[4 * i], block[4 * i + 1], block[4 * i + 2], block[4 * i + 3]])
        });
        let [mut a, mut b, mut c, mut d] = state;
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let f = f.wrapping_add(a).wrapping_add(k[i]).wrapping_add(m[g]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(f.rotate_left(S[i]));
        }
        state[0] = state[0].wrapping_add(a);
        state[1] = state[1].wrapping_add(b);
        state[2] = state[2].wrapping_add(c);
        state[3] = state[3].wrapping_add(d);
    }
    let mut out = [0u8; 16];
    for (i, w) in state.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers() -> Vec<String> {
        vec!["127.0.0.1:11211".to_owned(), "127.0.0.1:11212".to_owned(), "10.0.0.3:11213".to_owned()]
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn all_servers_places_everywhere() {
        let servers = vec!["a:1".to_owned(), "b:2".to_owned(), "c:3".to_owned()];
        let mut out = Vec::new();
        AllServers.place(b"k", &servers, &mut out);
        assert_eq!(out, vec![0, 1, 2]);
    }

    #[test]
    fn hash_functions_match_reference_vectors() {
        // zlib / binascii.crc32
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b"The quick brown fox jumps over the lazy dog"), 0x414f_a339);
        // RFC 1321 appendix A.5
        assert_eq!(hex(&md5(b"")), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(hex(&md5(b"abc")), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            hex(&md5(b"12345678901234567890123456789012345678901234567890123456789012345678901234567890")),
            "57edf4a22be3c955ac49da2e2107b67a"
        );
        // MurmurHash3_x86_32 reference values (seed 0).
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"hello", 0), 0x248b_fa47);
        assert_eq!(murmur3_32(b"The quick brown fox jumps over the lazy dog", 0), 0x2e4f_f723);
        // Bob Jenkins' one-at-a-time: "a" → 0xca2e9442.
        assert_eq!(one_at_a_time(b"a"), 0xca2e_9442);
        assert_eq!(one_at_a_time(b""), 0);
    }

    #[test]
    fn server_names_split_like_the_clients() {
        assert_eq!(split_server("127.0.0.1:11212"), ("127.0.0.1", 11212));
        assert_eq!(split_server("[::1]:11211"), ("::1", 11211));
        assert_eq!(split_server("cache.local:1"), ("cache.local", 1));
        assert_eq!(ketama_point_name("h:11211", 3), "h-3");
        assert_eq!(ketama_point_name("h:11212", 0), "h:11212-0");
        assert_eq!(Rendezvous::new(&["[::1]:5".to_owned()]).names(), ["::1:5"]);
    }

    #[test]
    fn every_placement_picks_exactly_one_server_and_spreads_keys() {
        let s = servers();
        for d in [
            Distribution::Modula,
            Distribution::Ketama,
            Distribution::KetamaWeighted,
            Distribution::Rendezvous,
            Distribution::Pylibmc,
        ] {
            let mc = MemcachedConfig {
                servers: s.clone(),
                key_prefix: String::new(),
                codec: Default::default(),
                exptime: 0,
                max_item_size: 1 << 20,
                coalesce_ms: 2,
                timeout_ms: 1000,
                distribution: d,
                weights: Vec::new(),
            };
            let p = for_config(&mc);
            let mut counts = [0usize; 3];
            let mut out = Vec::new();
            for i in 0..3000 {
                out.clear();
                p.place(format!("app:test{i}").as_bytes(), &s, &mut out);
                assert_eq!(out.len(), 1, "{d}");
                counts[out[0]] += 1;
            }
            assert!(counts.iter().all(|&c| c > 500), "{d}: {counts:?}");
        }
    }

    #[test]
    fn modula_weights_repeat_buckets() {
        let m = Modula::new(&[1, 2]);
        assert_eq!(m.buckets, vec![0, 1, 1]);
        let mut out = Vec::new();
        m.place(b"k", &[], &mut out);
        assert_eq!(out, vec![[0, 1, 1][cmemcache_hash(b"k") as usize % 3]]);
    }

    #[test]
    fn weighted_ketama_points_follow_the_weights() {
        let s = servers();
        let k = Ketama::weighted(&s, &[1, 1, 1]);
        // 160 points per server with equal weights (floor(1/3*40*3 + ε)*4).
        assert_eq!(k.points.len(), 480);
        let k = Ketama::weighted(&s, &[1, 2, 1]);
        let per: Vec<usize> = (0..3).map(|i| k.points.iter().filter(|p| p.1 == i).count()).collect();
        assert_eq!(per, vec![120, 240, 120]);
        assert_eq!(Ketama::new(&s).points.len(), 300);
    }
}
