import Foundation
import XCTest

/// `convert -B`: the new image is backed by the given file and holds only what differs
/// from it (qemu-img 7.2 copies everything again); read through the chain by qemu-img, it
/// equals the source.
final class ConvertBackingTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    func testConvertWithBackingWritesOnlyWhatDiffers() throws {
        let s = try Scratch()
        for fmt in ["qcow2", "qed"] {
            let base = s.path("base.\(fmt)"), full = s.path("full.qcow2"), out = s.path("top.\(fmt)")
            try Harness.run(["qemu-img", "create", "-q", "-f", fmt, base, "32M"])
            try Harness.run(["qemu-io", "-f", fmt, "-c", "write -P 1 0 8M", "-c", "write -P 2 16M 2M", base])
            try Harness.run(["qemu-img", "convert", "-O", "qcow2", base, full])
            // Changes: new data, zeros over backing data, data where the backing has none.
            try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 3 1M 64k", "-c", "write -z 16M 128k",
                             "-c", "write -P 4 24M 4k", full])
            try Harness.run([Harness.rawmount, "convert", "-O", fmt, "-B", base, "-F", fmt, full, out])
            XCTAssertEqual(try Harness.run(["qemu-img", "compare", out, full], check: false).status, 0, fmt)
            let map = try Harness.run(["qemu-img", "map", "--output=json", out]).out
            let own = map.split(separator: "\n").filter { $0.contains("\"depth\": 0") && $0.contains("\"data\": true") }
            let bytes = own.compactMap { line -> Int? in
                guard let r = line.firstRange(of: "\"length\": ") else { return nil }
                return Int(line[r.upperBound...].prefix { $0.isNumber })
            }.reduce(0, +)
            // Only the 64 KiB and 4 KiB of new data are the top's own data (a cluster each).
            XCTAssertLessThanOrEqual(bytes, 2 << 20, "\(fmt): \(map)")
            XCTAssertGreaterThan(bytes, 0, "\(fmt): \(map)")
            XCTAssertTrue(try Harness.run(["qemu-img", "info", out]).out.contains("backing file: " + base), fmt)
        }
    }

    /// `-n` writes into an existing image (zeros made zero over what it held); `-S 0` writes
    /// every byte (fully allocated, as qemu-img -S 0); `-S 64k` skips only whole zero 64 KiB
    /// blocks. Each equal to the source through qemu-img.
    func testConvertIntoAnExistingImageAndSparseSize() throws {
        let s = try Scratch()
        let src = s.path("src.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", src, "16M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -z 2M 1M", "-c", "write -P 0 4M 64k",
                         "-c", "write -P 3 8M 4k", src])
        let existing = s.path("existing.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", existing, "16M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 16M", existing])
        try Harness.run([Harness.rawmount, "convert", "-n", "-O", "qcow2", src, existing])
        XCTAssertEqual(try Harness.run(["qemu-img", "compare", src, existing], check: false).status, 0, "-n")
        let full = s.path("full.qcow2"), theirs = s.path("theirs.qcow2")
        try Harness.run([Harness.rawmount, "convert", "-O", "qcow2", "-S", "0", src, full])
        try Harness.run(["qemu-img", "convert", "-O", "qcow2", "-S", "0", src, theirs])
        XCTAssertEqual(try Harness.run(["qemu-img", "compare", src, full], check: false).status, 0, "-S 0")
        let holes = try Harness.run(["qemu-img", "map", "--output=json", full]).out.split(separator: "\n").filter { $0.contains("\"data\": false") }
        XCTAssertTrue(holes.isEmpty, "-S 0 left unallocated ranges: \(holes)")
        XCTAssertEqual(try Files.size(full), try Files.size(theirs), "-S 0: not as fully allocated as qemu-img's")
        let coarse = s.path("coarse.qcow2")
        try Harness.run([Harness.rawmount, "convert", "-O", "qcow2", "-S", "64k", src, coarse])
        XCTAssertEqual(try Harness.run(["qemu-img", "compare", src, coarse], check: false).status, 0, "-S 64k")
        XCTAssertNotEqual(try Harness.run([Harness.rawmount, "convert", "-O", "qcow2", "-S", "1000", src, s.path("bad.qcow2")], check: false).status, 0)
    }
}
