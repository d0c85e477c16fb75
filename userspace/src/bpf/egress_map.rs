//! The `EGRESS` map (see forkscope_common::egress) opened from its pin, for the daemon's
//! trace reader: its own handle, so reading it never waits for the probe's lock.

use std::path::Path;

use aya::maps::{Map, MapData, PerCpuHashMap};
use forkscope_common::egress::{EgressCount, EgressKey};

use crate::error::{Error, Result};

/// What the `egress` program counted, per branch and destination.
pub struct EgressMap {
    map: PerCpuHashMap<MapData, EgressKey, EgressCount>,
}

impl EgressMap {
    /// Opens the map pinned under `pin_dir` (the directory [`super::Probe::pin`] used).
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let path = pin_dir.join("maps").join("EGRESS");
        let data = MapData::from_pin(&path).map_err(|e| Error::Map {
            name: "EGRESS",
            cause: Box::new(e),
        })?;
        let map = PerCpuHashMap::try_from(Map::PerCpuLruHashMap(data)).map_err(|e| Error::Map {
            name: "EGRESS",
            cause: Box::new(e),
        })?;
        Ok(Self { map })
    }

    /// Every entry, summed over CPUs (entries removed while read are skipped).
    pub fn counts(&self) -> Vec<(EgressKey, EgressCount)> {
        self.map
            .iter()
            .flatten()
            .map(|(k, per_cpu)| {
                let sum = per_cpu
                    .iter()
                    .fold(EgressCount::default(), |a, c| EgressCount {
                        bytes: a.bytes + c.bytes,
                        packets: a.packets + c.packets,
                    });
                (k, sum)
            })
            .collect()
    }

    /// Removes the entries of cgroup `id`.
    pub fn forget(&mut self, id: u64) {
        let keys: Vec<EgressKey> = self
            .map
            .keys()
            .flatten()
            .filter(|k| k.cgroup == id)
            .collect();
        for k in keys {
            let _ = self.map.remove(&k);
        }
    }
}
