import XCTest
import TestSupport
@testable import BlockEngine

/// DirtyBitmap against a plain Bool array, with random marks, clears, word merges and
/// runs across page and word edges and a partial last granule.
final class DirtyBitmapTests: XCTestCase {
    func testAgreesWithAPlainBoolArray() {
        var rng = SeededRandom(seed: 11)
        for (granularity, size) in [(UInt64(512), UInt64(70_000 * 512 + 512)), (4096, 3 * 32768 * 4096 + 1024), (65536, 1 << 30)] {
            let bits = DirtyBitmap(granularity: granularity, diskSize: size)
            var plain = [Bool](repeating: false, count: Int(bits.granules))
            for step in 0..<300 {
                let off = rng.next() % size, len = 1 + rng.next() % (granularity * 70_000)
                if step % 7 == 6 {
                    let g = off / granularity
                    bits.setGranules(g, g + len / granularity, to: false)
                    for k in Int(g) ..< Int(min(bits.granules, g + len / granularity)) { plain[k] = false }
                } else if step % 11 == 10 {
                    let start = (off / granularity) / 64 * 64
                    let words = (0..<4).map { _ in rng.next() }
                    bits.merge(words: words, from: start)
                    for (w, word) in words.enumerated() {
                        for b in 0..<64 where word >> UInt64(b) & 1 != 0 {
                            let k = Int(start) + w * 64 + b
                            if k < plain.count { plain[k] = true }
                        }
                    }
                } else {
                    bits.mark(off, length: len)
                    for k in Int(off / granularity) ..< Int(min(bits.granules, (min(off + len, size) + granularity - 1) / granularity)) { plain[k] = true }
                }
            }
            // Runs from random offsets match the plain array, bounded by maxLength and the disk.
            for _ in 0..<200 {
                let off = rng.next() % size, maxLength = 1 + rng.next() % (size - off)
                let r = bits.run(from: off, maxLength: maxLength)
                let g = Int(off / granularity)
                XCTAssertEqual(r.dirty, plain[g], "\(granularity): state at \(off)")
                XCTAssertGreaterThan(r.length, 0)
                XCTAssertLessThanOrEqual(r.length, maxLength)
                let end = off + r.length
                for k in g ..< Int((end + granularity - 1) / granularity) { XCTAssertEqual(plain[k], r.dirty, "\(granularity): granule \(k) in run from \(off)") }
                if end < min(size, off + maxLength) { XCTAssertNotEqual(plain[Int(end / granularity)], r.dirty, "\(granularity): run from \(off) ends early at \(end)") }
            }
            let count = UInt64(plain.filter { $0 }.count)
            let tail = plain.last == true ? bits.granules * granularity - size : 0
            XCTAssertEqual(bits.dirtyBytes, count * granularity - tail, "\(granularity): dirty bytes")
            var extents: UInt64 = 0
            bits.forEachDirtyExtent { _, n in extents += n }
            XCTAssertEqual(extents, bits.dirtyBytes)
            // Words serialize what is set, and nil only where nothing is.
            for _ in 0..<50 {
                let start = (rng.next() % bits.granules) / 64 * 64
                let w = bits.words(from: start, count: 4096)
                let any = (Int(start) ..< min(plain.count, Int(start) + 4096)).contains { plain[$0] }
                XCTAssertEqual(w != nil, any)
                if let w { for k in 0..<min(4096, plain.count - Int(start)) { XCTAssertEqual(w[k / 64] >> UInt64(k % 64) & 1 != 0, plain[Int(start) + k]) } }
            }
            bits.clearAll()
            XCTAssertEqual(bits.dirtyBytes, 0)
            XCTAssertEqual(bits.run(from: 0, maxLength: size).length, size)
        }
    }

    func testMergeRoundsOutToTheTargetsGranules() {
        let fine = DirtyBitmap(granularity: 512, diskSize: 1 << 20)
        fine.mark(70_000, length: 1)
        fine.mark(200_000, length: 100_000)
        let coarse = DirtyBitmap(granularity: 65536, diskSize: 1 << 20)
        coarse.merge(fine)
        var got: [[UInt64]] = []
        coarse.forEachDirtyExtent { got.append([$0, $1]) }
        XCTAssertEqual(got, [[65536, 65536], [196608, 131072]])
        // Marks past the disk are clipped; a partial last granule counts only its bytes.
        let odd = DirtyBitmap(granularity: 4096, diskSize: 10_240)
        odd.mark(9000, length: 1 << 20)
        XCTAssertEqual(odd.dirtyBytes, 10_240 - 8192)
        XCTAssertEqual(odd.run(from: 8192, maxLength: 1 << 30).length, 2048)
    }

    /// An all-ones bitmap (a hostile image's, or a disk rewritten whole) costs no page of its
    /// own: full pages share one array, whether set by writes or loaded from the image.
    func testFullPagesShareOneArray() {
        let bits = DirtyBitmap(granularity: 512, diskSize: 1 << 40)  // 2^31 granules, 65536 pages
        bits.mark(0, length: 1 << 40)
        XCTAssertEqual(bits.ownPages, 0)
        XCTAssertEqual(bits.dirtyBytes, 1 << 40)
        bits.setGranules(5, 6, to: false)
        XCTAssertEqual(bits.ownPages, 1, "clearing a bit copies only its page")
        XCTAssertEqual(bits.dirtyBytes, (1 << 40) - 512)
        XCTAssertEqual(bits.run(from: 0, maxLength: 1 << 40).length, 5 * 512)
        // Loaded a cluster of words at a time, as a qcow2 bitmap's data is.
        let loaded = DirtyBitmap(granularity: 512, diskSize: 1 << 36)
        for c in 0..<64 { loaded.merge(words: [UInt64](repeating: ~0, count: 8192), from: UInt64(c) * 8192 * 64) }
        XCTAssertEqual(loaded.ownPages, 0)
        XCTAssertEqual(loaded.dirtyBytes, 64 * 8192 * 64 * 512)
        // Partly set pages stay their own, and agree with the bits set.
        loaded.mark(1 << 35, length: 4096)
        XCTAssertEqual(loaded.ownPages, 1)
        XCTAssertEqual(loaded.dirtyBytes, 64 * 8192 * 64 * 512 + 4096)
    }
}
