/* Per-pod counters. */
#ifndef MESHAGENT_METRICS_H
#define MESHAGENT_METRICS_H

#include "lib/maps.h"

static __always_inline struct ma_pod_stats *ma_stats_for(__u32 ifindex)
{
	struct ma_pod_stats zero = {};
	struct ma_pod_stats *st = ma_stats.lookup(&ifindex);

	if (st)
		return st;
	ma_stats.update(&ifindex, &zero);
	return ma_stats.lookup(&ifindex);
}

static __always_inline int ma_drop(__u32 ifindex, __u32 reason)
{
	struct ma_pod_stats *st = ma_stats_for(ifindex);

	if (st && reason < DROP_REASON_MAX)
		st->drops[reason] += 1;
	return TC_ACT_SHOT;
}

static __always_inline void ma_count_out(__u32 ifindex, __u32 len)
{
	struct ma_pod_stats *st = ma_stats_for(ifindex);

	if (st) {
		st->captured_out_packets += 1;
		st->captured_out_bytes += len;
	}
}

static __always_inline void ma_count_in(__u32 ifindex, __u32 len)
{
	struct ma_pod_stats *st = ma_stats_for(ifindex);

	if (st) {
		st->captured_in_packets += 1;
		st->captured_in_bytes += len;
	}
}

#endif
