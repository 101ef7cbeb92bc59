/// The one function that splits a byte range at cluster boundaries; every format's table
/// walk uses it instead of re-deriving the arithmetic.
public struct ClusterStep: Equatable, Sendable {
    /// Guest offset of this piece.
    public var offset: UInt64
    /// Bytes in this piece (never crosses a cluster boundary).
    public var length: UInt64
    /// Index of the cluster the piece lies in.
    public var cluster: UInt64
    /// Offset of the piece inside its cluster.
    public var offsetInCluster: UInt64
    @inlinable public init(offset: UInt64, length: UInt64, cluster: UInt64, offsetInCluster: UInt64) {
        self.offset = offset; self.length = length; self.cluster = cluster; self.offsetInCluster = offsetInCluster
    }
}

public enum RangeWalk {
    /// Calls `body` for each cluster-bounded piece of `[offset, offset+length)`. `clusterSize`
    /// must be a power of two. `body` returns false to stop early.
    @inlinable
    public static func clusters(_ offset: UInt64, length: UInt64, clusterSize: UInt64,
                                _ body: (ClusterStep) throws -> Bool) rethrows {
        precondition(clusterSize.isPowerOfTwo)
        var pos = offset
        let end = offset + length
        let mask = clusterSize - 1
        while pos < end {
            let inCluster = pos & mask
            let n = min(clusterSize - inCluster, end - pos)
            let step = ClusterStep(offset: pos, length: n, cluster: pos / clusterSize, offsetInCluster: inCluster)
            if try !body(step) { return }
            pos += n
        }
    }

    /// Bytes from `offset` to the end of its cluster, capped at `maxLength`.
    @inlinable
    public static func toClusterEnd(_ offset: UInt64, clusterSize: UInt64, maxLength: UInt64) -> UInt64 {
        min(clusterSize - (offset & (clusterSize - 1)), maxLength)
    }
}
