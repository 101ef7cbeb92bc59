import Foundation
import XCTest

/// `rawmount hash`: digests of the guest disk equal `sha256sum`/`md5sum`/... of
/// `qemu-img convert -O raw` of the same image, for a whole disk, a partition and a
/// backing chain; `--verify` exits 0 on a match and 1 naming both values otherwise.
final class HashTests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.tool("qemu-img")
    }

    func sum(_ tool: String, _ file: String) throws -> String {
        String(try Harness.run([tool, file]).out.prefix { $0 != " " })
    }

    func testDigestsEqualCoreutilsOnQemusRawView() throws {
        let s = try Scratch()
        // Data, zeros, a hole and data again, past several 4 MiB chunks; 64 MiB + 1536 bytes
        // so the last chunk is short and not cluster-aligned.
        let img = s.path("h.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "\((64 << 20) + 1536)"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 3M", "-c", "write -z 3M 2M",
                         "-c", "write -P 0x11 9M 5M", "-c", "write -P 0x7e 64M 1536", img])
        let raw = s.path("h.raw")
        try Harness.run(["qemu-img", "convert", "-O", "raw", img, raw])
        let out = try Harness.run([Harness.rawmount, "hash", "-a", "sha256", "-a", "md5", "-a", "sha1", "-a", "sha512", img]).out
        for (name, tool) in [("SHA256", "sha256sum"), ("MD5", "md5sum"), ("SHA1", "sha1sum"), ("SHA512", "sha512sum")] {
            XCTAssertTrue(out.contains("\(name) (\(img)) = \(try sum(tool, raw))\n"), "\(name) differs from \(tool):\n\(out)")
        }
        // JSON, and an overlay over this image hashes like its own raw view.
        let json = try Harness.run([Harness.rawmount, "hash", "--json", img]).out
        let obj = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: Any]
        XCTAssertEqual((obj["digests"] as! [String: String])["sha256"], try sum("sha256sum", raw))
        XCTAssertEqual((obj["bytes"] as! NSNumber).intValue, (64 << 20) + 1536)
        let top = s.path("top.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", img, "-F", "qcow2", top])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 4M 1M", top])
        let topRaw = s.path("top.raw")
        try Harness.run(["qemu-img", "convert", "-O", "raw", top, topRaw])
        XCTAssertTrue(try Harness.run([Harness.rawmount, "hash", top]).out.hasSuffix("= \(try sum("sha256sum", topRaw))\n"),
                      "a backing chain hashes differently from its raw view")
    }

    func testVerifyAndPartitionHash() throws {
        let s = try Scratch()
        let raw = s.path("p.raw")
        try Harness.run(["truncate", "-s", "32M", raw])
        try Harness.run(["sfdisk", "-q", raw], input: Data("label: dos\nstart=2048, size=20480, type=83\n".utf8))
        try Files.pwrite(raw, [UInt8](repeating: 0xC3, count: 3 << 20), at: 2048 * 512 + 4096)
        let img = s.path("p.vdi")
        try Harness.run(["qemu-img", "convert", "-O", "vdi", raw, img])
        let whole = try sum("md5sum", raw)
        let ok = try Harness.run([Harness.rawmount, "hash", "--verify", whole.uppercased(), img], check: false)
        XCTAssertEqual(ok.status, 0, ok.err)
        XCTAssertTrue(ok.out.contains("MD5 (\(img)) = \(whole)"), "the digest --verify's length names was not used: \(ok.out)")
        let wrong = String(repeating: "0", count: 64)
        let bad = try Harness.run([Harness.rawmount, "hash", "--verify", wrong, img], check: false)
        XCTAssertEqual(bad.status, 1)
        let real = try sum("sha256sum", raw)
        XCTAssertTrue(bad.err.contains(wrong) && bad.err.contains(real), "the mismatch does not name both values: \(bad.err)")
        // Partition 1: the bytes at its offset, as dd cuts them.
        let slice = s.path("p1.raw")
        try Harness.run(["dd", "if=\(raw)", "of=\(slice)", "bs=512", "skip=2048", "count=20480", "status=none"])
        let part = try Harness.run([Harness.rawmount, "hash", "--partition", "1", img]).out
        XCTAssertTrue(part.hasSuffix("= \(try sum("sha256sum", slice))\n"), part)
        let missing = try Harness.run([Harness.rawmount, "hash", "--partition", "3", img], check: false)
        XCTAssertEqual(missing.status, 2)
        XCTAssertTrue(missing.err.contains("no partition 3") && missing.err.contains("partitions: 1"), missing.err)
        // An unknown algorithm or a digest of no known length is a usage error, not a mismatch.
        XCTAssertEqual(try Harness.run([Harness.rawmount, "hash", "-a", "crc32", img], check: false).status, 2)
        XCTAssertEqual(try Harness.run([Harness.rawmount, "hash", "--verify", "abc", img], check: false).status, 2)
    }
}
