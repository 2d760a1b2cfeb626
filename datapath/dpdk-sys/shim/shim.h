/* What geneflow uses of DPDK: the headers bindgen reads, and the shim's functions, which
 * wrap DPDK's static inline fast-path functions (no symbol to link against otherwise). */
#include <rte_config.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_version.h>

uint16_t gf_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
uint16_t gf_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
struct rte_mbuf *gf_pktmbuf_alloc(struct rte_mempool *mp);
int gf_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **mbufs, unsigned int n);
void gf_pktmbuf_free(struct rte_mbuf *m);
/* The first segment's data and its length. */
uint8_t *gf_pktmbuf_data(struct rte_mbuf *m);
uint16_t gf_pktmbuf_data_len(const struct rte_mbuf *m);
uint16_t gf_pktmbuf_nb_segs(const struct rte_mbuf *m);
/* Grows the data by `len` bytes at the end; NULL if the tailroom is short. */
uint8_t *gf_pktmbuf_append(struct rte_mbuf *m, uint16_t len);
uint16_t gf_pktmbuf_tailroom(const struct rte_mbuf *m);
/* rte_errno is a per-lcore (thread-local) variable. */
int gf_errno(void);
