//! Pure decision rules the agent applies: the election order (H2), the
//! heartbeat-datastore choice (H5) and the classification of a silent host
//! (H4). Kept apart from the state machine so each rule is tested on its own.

use crate::types::{DatastoreId, HostHaState, HostId};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

/// Election order: more mounted datastores wins; on a tie the lexically
/// highest host id *as a string* wins ("host-99" beats "host-100").
/// Returns `Greater` when `a` beats `b`.
pub fn election_cmp(a: (&HostId, u32), b: (&HostId, u32)) -> Ordering {
    a.1.cmp(&b.1).then_with(|| a.0.as_str().cmp(b.0.as_str()))
}

/// The winner among candidates `(host, datastore count)`.
pub fn election_winner<'a>(
    cands: impl IntoIterator<Item = (&'a HostId, u32)>,
) -> Option<&'a HostId> {
    cands
        .into_iter()
        .max_by(|a, b| election_cmp(*a, *b))
        .map(|(h, _)| h)
}

/// Heartbeat datastores for `host` (H5): among the datastores it mounts that
/// at least one other host mounts too (a datastore only one host sees tells
/// nobody anything), the ones seen by the most hosts, ties broken by id so
/// every host computes the same list. `want` is clamped to 2..=5. Fewer than
/// two are returned only when fewer than two qualify; the caller reports it.
pub fn heartbeat_datastores(
    host: &HostId,
    mounts: &BTreeMap<HostId, BTreeSet<DatastoreId>>,
    want: usize,
) -> Vec<DatastoreId> {
    let want = want.clamp(2, 5);
    let Some(mine) = mounts.get(host) else {
        return Vec::new();
    };
    let mut cands: Vec<(usize, &DatastoreId)> = mine
        .iter()
        .map(|ds| (mounts.values().filter(|m| m.contains(ds)).count(), ds))
        .filter(|(n, _)| *n > 1)
        .collect();
    cands.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    cands
        .into_iter()
        .take(want)
        .map(|(_, ds)| ds.clone())
        .collect()
}

/// What the master knows about a host that sent no network heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsEvidence {
    /// A heartbeat record of the host changed recently.
    Alive,
    /// Every readable record has been unchanged for the liveness timeout.
    Stale,
    /// No record could be read (I/O errors, or the master mounts none of the
    /// host's heartbeat datastores): no conclusion.
    Unknown,
}

/// Classifies a host with no network heartbeat (H4). `published` is what the
/// host last wrote in its own datastore heartbeat record: its state and how
/// many agents it hears.
///
/// | ping | datastore | state |
/// |------|-----------|-------|
/// | any  | alive, published "isolated" | isolated (the host said so itself) |
/// | yes  | alive     | partitioned (lost connectivity to this master) |
/// | no   | alive, hears other agents | partitioned: it talks to hosts on its side; the partition cuts ICMP too |
/// | no   | alive, hears no agent | isolated |
/// | no   | stale     | failed: its VMs are restarted |
/// | yes  | stale     | unresponsive: the kernel answers but the agent writes nothing. The agent may just be dead while its VMs (whose VMM processes outlive it) keep running, so the master reads each VM's lease and restarts only the VMs whose lease it has seen unrenewed for `stop_time + io_timeout` (their owner has stopped them) or that another host now holds |
/// | any  | unknown   | unresponsive as well: the master cannot read the heartbeat; the same per-VM lease check applies, and with no storage access it restarts nothing |
pub fn classify(ping: bool, ds: DsEvidence, published: Option<(HostHaState, u32)>) -> HostHaState {
    match (ping, ds) {
        (_, DsEvidence::Alive) if published.is_some_and(|p| p.0 == HostHaState::Isolated) => {
            HostHaState::Isolated
        }
        (true, DsEvidence::Alive) => HostHaState::Partitioned,
        (false, DsEvidence::Alive) if published.is_some_and(|p| p.1 > 0) => {
            HostHaState::Partitioned
        }
        (false, DsEvidence::Alive) => HostHaState::Isolated,
        (false, DsEvidence::Stale) => HostHaState::Failed,
        (true, DsEvidence::Stale) => HostHaState::Unresponsive,
        (_, DsEvidence::Unknown) => HostHaState::Unresponsive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> HostId {
        HostId::new(s)
    }

    #[test]
    fn election_string_order() {
        assert_eq!(
            election_cmp((&h("host-99"), 3), (&h("host-100"), 3)),
            Ordering::Greater
        );
        assert_eq!(
            election_cmp((&h("host-1"), 4), (&h("host-99"), 3)),
            Ordering::Greater
        );
        let (a, b, c) = (h("host-100"), h("host-99"), h("host-2"));
        assert_eq!(election_winner([(&a, 2), (&b, 2), (&c, 1)]), Some(&b));
    }

    #[test]
    fn datastore_selection() {
        let ds = |v: &[&str]| {
            v.iter()
                .map(|s| DatastoreId::new(*s))
                .collect::<BTreeSet<_>>()
        };
        let mounts: BTreeMap<HostId, BTreeSet<DatastoreId>> = [
            (h("a"), ds(&["local-a", "ds1", "ds2", "ds3"])),
            (h("b"), ds(&["ds1", "ds2", "ds3", "ds4"])),
            (h("c"), ds(&["ds2", "ds4"])),
        ]
        .into_iter()
        .collect();
        // ds2 seen by 3 hosts, then ds1/ds3 (2 each, id order); local-a never.
        assert_eq!(
            heartbeat_datastores(&h("a"), &mounts, 2),
            ds(&["ds1", "ds2"])
                .into_iter()
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
        );
        assert_eq!(
            heartbeat_datastores(&h("a"), &mounts, 5),
            vec![DatastoreId::new("ds2"), "ds1".into(), "ds3".into()]
        );
        assert_eq!(
            heartbeat_datastores(&h("c"), &mounts, 1),
            vec![DatastoreId::new("ds2"), "ds4".into()]
        );
        assert!(heartbeat_datastores(&h("zz"), &mounts, 2).is_empty());
    }

    #[test]
    fn classification_table() {
        use HostHaState::*;
        assert_eq!(classify(true, DsEvidence::Alive, None), Partitioned);
        assert_eq!(classify(false, DsEvidence::Alive, None), Isolated);
        assert_eq!(
            classify(false, DsEvidence::Alive, Some((Election, 0))),
            Isolated
        );
        assert_eq!(
            classify(false, DsEvidence::Alive, Some((Master, 0))),
            Isolated
        );
        assert_eq!(
            classify(false, DsEvidence::Alive, Some((Master, 2))),
            Partitioned
        );
        assert_eq!(
            classify(true, DsEvidence::Alive, Some((Isolated, 0))),
            Isolated
        );
        assert_eq!(classify(false, DsEvidence::Stale, None), Failed);
        assert_eq!(
            classify(true, DsEvidence::Stale, Some((Slave, 3))),
            Unresponsive
        );
        assert_eq!(classify(false, DsEvidence::Unknown, None), Unresponsive);
    }
}
