//! Key enumeration (`sink::enumerate`) against real memcached servers.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use tailcache::sink::enumerate::{Counts, EnumerateError, KeyEnumerator, Options, Walk};

use crate::harness::Memcached;

/// Sends `commands` (noreply storage commands) on one connection, then
/// `version`: memcached answers it only after the commands before it on
/// the same connection were processed.
fn pipeline(m: &Memcached, commands: &[u8]) {
    let mut s = TcpStream::connect(m.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(commands).unwrap();
    s.write_all(b"version\r\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    assert!(line.starts_with("VERSION "), "{line:?}");
}

fn set_noreply(out: &mut Vec<u8>, key: &[u8], exptime: i64) {
    out.extend_from_slice(b"set ");
    out.extend_from_slice(key);
    out.extend_from_slice(format!(" 0 {exptime} 1 noreply\r\nv\r\n").as_bytes());
}

async fn enumerate(addr: &str, prefix: &[u8], opts: &Options) -> Result<(BTreeSet<Vec<u8>>, Counts), EnumerateError> {
    let mut e = KeyEnumerator::start(addr, prefix, opts).await?;
    let mut keys = BTreeSet::new();
    while let Some(batch) = e.next_batch().await? {
        assert!(batch.len() <= opts.batch_size, "a batch of {} keys", batch.len());
        for k in batch {
            assert!(keys.insert(k.clone()), "listed twice: {:?}", String::from_utf8_lossy(&k));
        }
    }
    Ok((keys, e.counts()))
}

#[tokio::test]
async fn lists_exactly_the_keys_under_the_prefix() {
    let m = Memcached::start();
    let mut want = BTreeSet::new();
    let mut cmds = Vec::new();
    for i in 0..1000 {
        // Characters memcached URL-encodes, and UTF-8.
        let key = match i % 4 {
            0 => format!("enum:page:{i}"),
            1 => format!("enum:a/b%25+{i}"),
            2 => format!("enum:né:{{{i}}}"),
            _ => format!("enum:{i}"),
        };
        set_noreply(&mut cmds, key.as_bytes(), 0);
        want.insert(key.into_bytes());
    }
    for i in 0..500 {
        for foreign in [format!("other:{i}"), format!("enu:{i}"), format!("ENUM:{i}"), format!("xenum:{i}")] {
            set_noreply(&mut cmds, foreign.as_bytes(), 0);
        }
    }
    // Already expired: metadump leaves it out, as `get` would.
    set_noreply(&mut cmds, b"enum:expired", -1);
    // A binary key (meta protocol, base64) with a space and a byte that is
    // not UTF-8: listed as it is.
    cmds.extend_from_slice(b"ms ZW51bTogeP8= 1 b q\r\nv\r\n");
    want.insert(b"enum: x\xff".to_vec());
    pipeline(&m, &cmds);

    let opts = Options { batch_size: 64, ..Options::default() };
    let (keys, counts) = enumerate(&m.addr(), b"enum:", &opts).await.unwrap();
    assert_eq!(keys.len(), want.len());
    assert_eq!(keys, want);
    // memcached 1.6.18 walks its hash table.
    assert_eq!(counts, Counts { seen: 1001 + 2000, under_prefix: 1001, skipped: 0, busy_retries: 0, walk: Walk::Hash });

    // Everything, with an empty prefix; and a second run finds the same.
    let (all, counts) = enumerate(&m.addr(), b"", &Options::default()).await.unwrap();
    assert_eq!(all.len(), 3001);
    assert!(want.is_subset(&all));
    assert_eq!(counts.under_prefix, 3001);
    assert_eq!(enumerate(&m.addr(), b"enum:", &opts).await.unwrap().0, want);

    // The LRU walk of older servers: best effort (see the module docs), so
    // only keys that are there, each decoded like the hash walk's.
    let lru = Options { walk: Walk::Lru, ..opts };
    let (keys, counts) = enumerate(&m.addr(), b"enum:", &lru).await.unwrap();
    assert_eq!(counts.walk, Walk::Lru);
    assert!(!keys.is_empty() && keys.is_subset(&want), "{} keys", keys.len());
    assert_eq!(counts.under_prefix, keys.len() as u64);
    assert!(counts.seen <= 3001 && counts.skipped == 0, "{counts:?}");
}

#[tokio::test]
async fn an_empty_server_lists_nothing() {
    let m = Memcached::start();
    let (keys, counts) = enumerate(&m.addr(), b"", &Options::default()).await.unwrap();
    assert!(keys.is_empty());
    assert_eq!(counts, Counts::default());
}

#[tokio::test]
async fn a_server_without_crawler_or_dumping_refuses() {
    for (args, words) in [(&["-o", "no_lru_crawler"][..], "lru crawler disabled"), (&["-X"][..], "not allowed")] {
        let m = Memcached::start_with(args);
        let mut cmds = Vec::new();
        set_noreply(&mut cmds, b"enum:1", 0);
        pipeline(&m, &cmds);
        let e = enumerate(&m.addr(), b"enum:", &Options::default()).await.unwrap_err();
        assert!(e.is_refused(), "{e}");
        assert_eq!(e.server(), m.addr());
        match &e {
            EnumerateError::Refused { reason, .. } => assert!(reason.contains(words), "{args:?}: {reason:?}"),
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains(&m.addr()), "{e}");
    }
}

#[tokio::test]
async fn a_server_that_is_down_is_a_connect_error() {
    let mut m = Memcached::start();
    let addr = m.addr();
    m.stop();
    let e = enumerate(&addr, b"", &Options::default()).await.unwrap_err();
    assert!(matches!(&e, EnumerateError::Connect { server, .. } if *server == addr), "{e}");
    assert!(!e.is_refused());
}
