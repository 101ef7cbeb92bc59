import BlockEngine
import ImageFormats
import Dispatch
#if canImport(Glibc)
import Glibc
#endif

/// The copy itself (convert, backup): the source's data runs are read in large pieces and
/// written to the destination through the engine, skipping every 4 KiB block that reads as
/// zeros (a new image already reads as zeros there).
///
/// `ranges` limits the copy to those ranges of the disk (an incremental backup's dirty
/// extents); with `zeroing`, ranges and blocks that read as zeros are made zero in the
/// destination instead of skipped (over a backing file they must hide the older data).
struct ImageCopy {
    let source: BlockDevice
    let destination: BlockDevice
    var ranges: [(offset: UInt64, length: UInt64)]? = nil
    var zeroing = false
    /// The destination's backing chain (convert -B): only blocks that differ from it are
    /// written, zeros where the source reads zeros and the backing does not.
    var against: BlockDevice? = nil
    /// Blocks of this size that read as zeros are skipped (or zeroed); 0: nothing in a data
    /// run is skipped (convert -S 0).
    var sparseBlock = Self.block
    /// convert -c: whole clusters that are not all zeros are stored deflated in this qcow2
    /// destination (each that does not shrink is written as it is).
    var compressInto: (any CompressedClusterSink)? = nil
    static let piece = 4 << 20, block = 4096

    struct Totals { var read: UInt64 = 0, written: UInt64 = 0, zeroed: UInt64 = 0 }

    /// The pieces to read (data runs, each at most `piece` long) and the ranges that read
    /// as zeros, within `ranges` (the whole disk when nil).
    func plan() throws -> (runs: [(offset: UInt64, length: Int)], zeros: [(offset: UInt64, length: UInt64)]) {
        var runs: [(offset: UInt64, length: Int)] = []
        var zeros: [(offset: UInt64, length: UInt64)] = []
        for (start, length) in ranges ?? [(0, source.virtualSize)] {
            var pos = start
            let end = min(start + length, source.virtualSize)
            while pos < end {
                let s = try source.status(pos, maxLength: end - pos)
                let n = min(max(s.length, 1), end - pos)
                if s.data || sparseBlock == 0 && against == nil {  // -S 0: every byte written, holes too
                    var o = pos
                    while o < pos + n {
                        let k = Int(min(UInt64(Self.piece), pos + n - o))
                        runs.append((o, k)); o += UInt64(k)
                    }
                } else if let last = zeros.last, last.offset + last.length == pos {
                    zeros[zeros.count - 1].length += n
                } else {
                    zeros.append((pos, n))
                }
                pos += n
            }
        }
        return (runs, zeros)
    }

    /// `progress` gets the disk offset reached and the bytes read so far.
    func run(progress: (_ offset: UInt64, _ read: UInt64) -> Void) throws -> Totals {
        var totals = Totals()
        var (runs, zeros) = try plan()
        if let q = compressInto { runs = Self.clusterAligned(runs, cluster: q.unitBytes, size: source.virtualSize) }
        if zeroing {
            for z in zeros {
                try destination.zero(at: z.offset, length: z.length, deallocate: false)
                totals.zeroed += z.length
            }
        } else if let against {
            // The source reads zeros here: hide whatever data the backing holds.
            for z in zeros {
                var pos = z.offset
                while pos < z.offset + z.length {
                    let st = try against.status(pos, maxLength: z.offset + z.length - pos)
                    if st.data { try destination.zero(at: pos, length: st.length, deallocate: false); totals.zeroed += st.length }
                    pos += st.length
                }
            }
        }
        let old = against.map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: Self.piece, alignment: 4096) }
        defer { old?.deallocate() }
        let pieces = Pieces(source: source, runs: runs, size: Self.piece)
        defer { pieces.deallocate() }
        // Piece i+1 is read on a serial queue into the other buffer while piece i is written
        // (the read-ahead DiskHasher uses).
        let reader = DispatchQueue(label: "rawmount.convert-read")
        let read = pieces.read
        var current = runs.isEmpty ? nil : read(0)
        for (i, run) in runs.enumerated() {
            if let e = current?.error { throw e }
            let group = DispatchGroup()
            let box = Pieces.Box()
            if i + 1 < runs.count { reader.async(group: group) { box.value = read(i + 1) } }
            let buf = pieces.buffers[i % 2]
            totals.read += UInt64(run.length)
            do {
                if let against, let old { try against.read(into: UnsafeMutableRawBufferPointer(rebasing: old[0..<run.length]), at: run.offset) }
                // Stretches of blocks that need the same thing, each done in one call.
                var b = 0
                let unit = compressInto.map { Int($0.unitBytes) } ?? (sparseBlock > 0 ? sparseBlock : Self.block)
                while b < run.length {
                    let kind = need(buf, b, min(unit, run.length - b), old: old)
                    var e = b + unit
                    while e < run.length, need(buf, e, min(unit, run.length - e), old: old) == kind { e += unit }
                    let end = min(e, run.length), at = run.offset + UInt64(b)
                    switch kind {
                    case .skip: break
                    case .zero:
                        try destination.zero(at: at, length: UInt64(end - b), deallocate: false)
                        totals.zeroed += UInt64(end - b)
                    case .write:
                        if let q = compressInto {
                            try storeCompressed(q, UnsafeRawBufferPointer(rebasing: buf[b..<end]), at: at)
                        } else {
                            try destination.write(UnsafeRawBufferPointer(rebasing: buf[b..<end]), at: at)
                        }
                        totals.written += UInt64(end - b)
                    }
                    b = end
                }
            } catch { group.wait(); throw error }
            group.wait()
            current = box.value
            progress(run.offset + UInt64(run.length), totals.read)
        }
        return totals
    }

    /// Runs widened to whole clusters (the disk's end closing the last), merged, and cut into
    /// pieces again: compression takes whole clusters.
    static func clusterAligned(_ runs: [(offset: UInt64, length: Int)], cluster: UInt64, size: UInt64) -> [(offset: UInt64, length: Int)] {
        var merged: [(start: UInt64, end: UInt64)] = []
        for r in runs {
            let start = r.offset / cluster * cluster, end = min(size, (r.offset + UInt64(r.length) + cluster - 1) / cluster * cluster)
            if let last = merged.last, start <= last.end { merged[merged.count - 1].end = max(last.end, end) } else { merged.append((start, end)) }
        }
        let step = max(UInt64(piece) / cluster, 1) * cluster
        var out: [(offset: UInt64, length: Int)] = []
        for m in merged {
            var o = m.start
            while o < m.end { let k = min(step, m.end - o); out.append((o, Int(k))); o += k }
        }
        return out
    }

    /// Deflates the clusters of `bytes` (from the cluster at `at`) on every core, then stores
    /// them in order; one that does not shrink is written as it is.
    private func storeCompressed(_ q: any CompressedClusterSink, _ bytes: UnsafeRawBufferPointer, at: UInt64) throws {
        let cs = Int(q.unitBytes)
        let count = (bytes.count + cs - 1) / cs
        let workers = min(count, max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        // Each worker deflates every workers-th cluster with its own compressor.
        let parts = onAllCores(workers) { w -> [[UInt8]?] in
            let compressor = DeflateCompressor()
            return stride(from: w, to: count, by: workers).map { i in
                let piece = UnsafeRawBufferPointer(rebasing: bytes[i * cs ..< min(bytes.count, (i + 1) * cs)])
                if piece.count == cs { return q.compress(piece, with: compressor) }
                // The disk's last cluster, zero-padded as QEMU pads it.
                let padded = [UInt8](piece) + [UInt8](repeating: 0, count: cs - piece.count)
                return padded.withUnsafeBytes { q.compress($0, with: compressor) }
            }
        }
        var streams = [[UInt8]?](repeating: nil, count: count)
        for (w, part) in parts.enumerated() {
            for (k, stream) in try part.get().enumerated() { streams[w + k * workers] = stream }
        }
        for i in 0..<count {
            let offset = at + UInt64(i * cs)
            if let stream = streams[i] {
                try q.storeCompressed(stream, at: offset)
            } else {
                try destination.write(UnsafeRawBufferPointer(rebasing: bytes[i * cs ..< min(bytes.count, (i + 1) * cs)]), at: offset)
            }
        }
    }

    /// What one block of the source needs in the destination.
    enum Need { case skip, write, zero }

    private func need(_ buf: UnsafeMutableRawBufferPointer, _ at: Int, _ count: Int, old: UnsafeMutableRawBufferPointer?) -> Need {
        if sparseBlock == 0 && old == nil { return .write }
        let zero = Self.isZero(buf, at, count)
        if let old {
            if memcmp(buf.baseAddress! + at, old.baseAddress! + at, count) == 0 { return .skip }
            return zero ? .zero : .write
        }
        return zero ? (zeroing ? .zero : .skip) : .write
    }

    static func isZero(_ buf: UnsafeMutableRawBufferPointer, _ at: Int, _ count: Int) -> Bool {
        let base = buf.baseAddress! + at
        var i = 0
        while i + 8 <= count {
            if base.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
        }
        while i < count { if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }; i += 1 }
        return true
    }
}

/// The two piece buffers and the source, shared with the read-ahead queue.
private final class Pieces: @unchecked Sendable {
    final class Ahead: @unchecked Sendable { var error: (any Error)? }
    final class Box: @unchecked Sendable { var value: Ahead? }
    let source: BlockDevice
    let runs: [(offset: UInt64, length: Int)]
    let buffers: [UnsafeMutableRawBufferPointer]

    init(source: BlockDevice, runs: [(offset: UInt64, length: Int)], size: Int) {
        self.source = source; self.runs = runs
        buffers = (0..<2).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096) }
    }

    @Sendable func read(_ i: Int) -> Ahead {
        let a = Ahead()
        do { try source.read(into: UnsafeMutableRawBufferPointer(rebasing: buffers[i % 2][0..<runs[i].length]), at: runs[i].offset) } catch { a.error = error }
        return a
    }

    func deallocate() { for b in buffers { b.deallocate() } }
}
