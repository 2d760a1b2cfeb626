//! Packet mempools and ethdev ports: configured with one receive and one transmit queue per
//! poll thread, started, stopped and closed on drop.

use super::eal::Eal;
use super::{errno, strerror, DpdkError};
use std::ffi::CString;
use std::marker::PhantomData;

/// A pool of packet buffers (`rte_pktmbuf_pool_create`), freed on drop.
pub struct Mempool<'e> {
    pub(crate) raw: *mut dpdk_sys::rte_mempool,
    _eal: PhantomData<&'e Eal>,
}

// SAFETY: a DPDK mempool is safe to use from any thread (its per-lcore caches are only used
// by EAL threads; others go to the shared ring, which is multi-producer/consumer).
unsafe impl Send for Mempool<'_> {}
unsafe impl Sync for Mempool<'_> {}

impl<'e> Mempool<'e> {
    /// `n` buffers of `data_room` bytes (headroom included) each.
    pub fn new(
        _eal: &'e Eal,
        name: &str,
        n: u32,
        data_room: u16,
    ) -> Result<Mempool<'e>, DpdkError> {
        let cname = CString::new(name).map_err(|_| DpdkError::Nul(name.into()))?;
        // SAFETY: a NUL-terminated name; the EAL runs (borrowed).
        let raw = unsafe {
            dpdk_sys::rte_pktmbuf_pool_create(
                cname.as_ptr(),
                n,
                256,
                0,
                data_room,
                dpdk_sys::SOCKET_ID_ANY,
            )
        };
        if raw.is_null() {
            return Err(DpdkError::NoMemory(format!(
                "a pool of {n} buffers of {data_room} bytes: {}",
                strerror(errno())
            )));
        }
        Ok(Mempool {
            raw,
            _eal: PhantomData,
        })
    }
}

impl Drop for Mempool<'_> {
    fn drop(&mut self) {
        // SAFETY: the ports that used the pool borrow it and are closed; no buffer of it is
        // held (bursts free theirs when dropped).
        unsafe { dpdk_sys::rte_mempool_free(self.raw) }
    }
}

/// A started ethdev port.
pub struct EthPort<'p> {
    pub id: u16,
    pub name: String,
    pub queues: u16,
    _pool: PhantomData<&'p Mempool<'p>>,
}

/// The port's counters (`rte_eth_stats_get`).
#[derive(Debug, Clone, Copy, Default)]
pub struct PortStats {
    pub ipackets: u64,
    pub opackets: u64,
    pub ibytes: u64,
    pub obytes: u64,
    /// Dropped by the device: no buffer, or its queue full.
    pub imissed: u64,
    pub ierrors: u64,
    pub oerrors: u64,
    pub rx_nombuf: u64,
}

impl<'p> EthPort<'p> {
    /// Opens the port the EAL knows as `name` (a vdev name such as `net_af_packet0`, or a PCI
    /// address), with `queues` receive and transmit queues of `desc` descriptors, receiving
    /// into `pool`, in promiscuous mode, and starts it.
    pub fn open(
        name: &str,
        queues: u16,
        desc: u16,
        pool: &'p Mempool<'p>,
    ) -> Result<EthPort<'p>, DpdkError> {
        let cname = CString::new(name).map_err(|_| DpdkError::Nul(name.into()))?;
        let mut id: u16 = 0;
        // SAFETY: a NUL-terminated name and a valid out pointer.
        if unsafe { dpdk_sys::rte_eth_dev_get_port_by_name(cname.as_ptr(), &mut id) } != 0 {
            return Err(DpdkError::NoPort(name.into()));
        }
        let fail = |op: &'static str, rc: i32| DpdkError::Port {
            port: name.into(),
            op,
            reason: strerror(rc),
        };
        let conf = dpdk_sys::rte_eth_conf::default();
        // SAFETY: `id` is a valid port; `conf` is a zeroed (default) configuration.
        let rc = unsafe { dpdk_sys::rte_eth_dev_configure(id, queues, queues, &conf) };
        if rc != 0 {
            return Err(fail("configure", rc));
        }
        // From here a failure closes the port again.
        let port = EthPort {
            id,
            name: name.into(),
            queues,
            _pool: PhantomData,
        };
        // SAFETY: `id` is configured; a negative socket id means any.
        let socket = unsafe { dpdk_sys::rte_eth_dev_socket_id(id) };
        let socket = if socket < 0 { 0 } else { socket as u32 };
        for q in 0..queues {
            // SAFETY: a configured port, a queue below the configured count, default queue
            // configuration (NULL), and a live pool that outlives the port (borrowed).
            let rc = unsafe {
                dpdk_sys::rte_eth_rx_queue_setup(id, q, desc, socket, std::ptr::null(), pool.raw)
            };
            if rc != 0 {
                return Err(fail("receive queue setup", rc));
            }
            // SAFETY: as above.
            let rc =
                unsafe { dpdk_sys::rte_eth_tx_queue_setup(id, q, desc, socket, std::ptr::null()) };
            if rc != 0 {
                return Err(fail("transmit queue setup", rc));
            }
        }
        // SAFETY: a configured port with its queues set up.
        let rc = unsafe { dpdk_sys::rte_eth_dev_start(id) };
        if rc != 0 {
            return Err(fail("start", rc));
        }
        // Promiscuous: the port carries every VM's MAC (and the overlay's). Some drivers
        // cannot, and receive everything anyway (af_packet): not an error.
        // SAFETY: a started port.
        unsafe { dpdk_sys::rte_eth_promiscuous_enable(id) };
        Ok(port)
    }

    /// The port's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        let mut a = dpdk_sys::rte_ether_addr::default();
        // SAFETY: a valid port and out pointer.
        unsafe { dpdk_sys::rte_eth_macaddr_get(self.id, &mut a) };
        a.addr_bytes
    }

    /// The port's MTU (DPDK's: the largest IP packet, without the Ethernet header).
    pub fn mtu(&self) -> Option<u32> {
        let mut mtu = 0u16;
        // SAFETY: a valid port and out pointer.
        let rc = unsafe { dpdk_sys::rte_eth_dev_get_mtu(self.id, &mut mtu) };
        (rc == 0 && mtu > 0).then_some(mtu.into())
    }

    pub fn stats(&self) -> PortStats {
        let mut s = dpdk_sys::rte_eth_stats::default();
        // SAFETY: a valid port and out pointer.
        unsafe { dpdk_sys::rte_eth_stats_get(self.id, &mut s) };
        PortStats {
            ipackets: s.ipackets,
            opackets: s.opackets,
            ibytes: s.ibytes,
            obytes: s.obytes,
            imissed: s.imissed,
            ierrors: s.ierrors,
            oerrors: s.oerrors,
            rx_nombuf: s.rx_nombuf,
        }
    }
}

impl Drop for EthPort<'_> {
    fn drop(&mut self) {
        // SAFETY: no poll thread uses the port any more (they borrow it); stop then close.
        unsafe {
            dpdk_sys::rte_eth_dev_stop(self.id);
            dpdk_sys::rte_eth_dev_close(self.id);
        }
    }
}
