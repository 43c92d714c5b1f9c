//! Which servers hold a key.
//!
//! Readers of the cache (pylibmc, python-memcached, pymemcache's
//! `HashClient`, ...) each spread keys over servers their own way. Until
//! tailcache implements those distributions, it writes every key to every
//! server ([`AllServers`]), which is correct whatever distribution a reader
//! uses, at the price of memory on each server. Another placement only has
//! to implement [`Placement`].

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_servers_places_everywhere() {
        let servers = vec!["a:1".to_owned(), "b:2".to_owned(), "c:3".to_owned()];
        let mut out = Vec::new();
        AllServers.place(b"k", &servers, &mut out);
        assert_eq!(out, vec![0, 1, 2]);
    }
}
