import Foundation
import XCTest

/// VHD (`vpc`) images made by qemu-img and qemu-io, read through a mount and compared with
/// `qemu-img convert -O raw`; sizes as qemu-img info gives them.
final class VHDTests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("qemu-img")
    }

    private func be32(_ d: Data, _ o: Int) -> UInt32 { (0..<4).reduce(UInt32(0)) { $0 << 8 | UInt32(d[o + $1]) } }

    /// Rewrites the footer at `at` (checksum made valid again) after `change`.
    private func patchFooter(_ path: String, at: Int, _ change: (inout Data) -> Void) throws {
        var d = try Data(contentsOf: URL(fileURLWithPath: path))
        var footer = d.subdata(in: at ..< at + 512)
        change(&footer)
        footer.replaceSubrange(64 ..< 68, with: [0, 0, 0, 0])
        let sum = ~footer.reduce(UInt32(0)) { $0 &+ UInt32($1) }
        footer.replaceSubrange(64 ..< 68, with: (0..<4).map { UInt8(truncatingIfNeeded: sum >> (24 - 8 * UInt32($0))) })
        d.replaceSubrange(at ..< at + 512, with: footer)
        try d.write(to: URL(fileURLWithPath: path))
    }

    private func qemuSize(_ img: String) throws -> Int {
        let j = try JSONSerialization.jsonObject(with: Data(try Harness.run(["qemu-img", "info", "-f", "vpc", "--output=json", img]).out.utf8)) as! [String: Any]
        return j["virtual-size"] as! Int
    }

    private func ourSize(_ img: String, _ extra: [String] = []) throws -> Int {
        let out = try Harness.run([Harness.rawmount, "info", "--json"] + extra + [img]).out
        let j = try JSONSerialization.jsonObject(with: Data(out.utf8)) as! [String: Any]
        return j["virtual-size"] as! Int
    }

    func testDynamicAndFixedReadAsQemuReadsThem() throws {
        let s = try Scratch()
        for sub in ["dynamic", "fixed"] {
            let img = s.path("\(sub).vhd")
            try Harness.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=\(sub)", img, "64M"])
            try Harness.run(["qemu-io", "-f", "vpc", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0x33 40M 512k", "-c", "write -P 0x7e 63M 4k", img])
            let oracle = s.path("\(sub).oracle")
            try Harness.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", img, oracle])
            let sha = try Files.sha(img)
            let extra = sub == "fixed" ? ["--format", "vpc"] : []
            XCTAssertEqual(try ourSize(img, extra), try qemuSize(img), "\(sub): virtual size")
            // qemu-img info's keys: a cluster size for dynamic images only.
            let ours = try JSONSerialization.jsonObject(with: Data(try Harness.run([Harness.rawmount, "info", "--json"] + extra + [img]).out.utf8)) as! [String: Any]
            let theirs = try JSONSerialization.jsonObject(with: Data(try Harness.run(["qemu-img", "info", "-f", "vpc", "--output=json", img]).out.utf8)) as! [String: Any]
            XCTAssertEqual(ours["cluster-size"] as? Int, theirs["cluster-size"] as? Int, "\(sub): cluster-size")
            XCTAssertEqual(ours["format"] as? String, "vpc")
            // Asked for a writable mount, it mounts read-only and says why.
            let r = try Harness.run([Harness.rawmount, "mount"] + extra + [img, s.mnt])
            XCTAssertTrue(r.err.contains("read-only"), r.err)
            let raw = s.mnt + "/\(sub).raw"
            XCTAssertEqual(try Files.sha(raw), try Files.sha(oracle), "\(sub): the mount differs from qemu-img convert")
            XCTAssertEqual(open(raw, O_WRONLY), -1)
            try s.unmount()
            XCTAssertEqual(try Files.sha(img), sha, "\(sub): a read-only mount changed the image")
        }
    }

    /// Hyper-V ('win ') images are sized by the footer's current size, Virtual PC and old
    /// QEMU ones by their CHS geometry, as QEMU 7.2 does.
    func testSizeFollowsTheCreatorAsInQemu() throws {
        let s = try Scratch()
        let img = s.path("hv.vhd")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vpc", img, "100M"])
        // A current size that is not the geometry's: still the geometry for QEMU's creator.
        let size: [UInt8] = (0..<8).map { UInt8(truncatingIfNeeded: UInt64(100 << 20) >> (56 - 8 * UInt64($0))) }
        try patchFooter(img, at: 0) { $0.replaceSubrange(48 ..< 56, with: size) }
        let chs = try qemuSize(img)
        XCTAssertEqual(try ourSize(img), chs)
        try patchFooter(img, at: 0) { $0.replaceSubrange(28 ..< 32, with: Array("win ".utf8)) }
        XCTAssertEqual(try qemuSize(img), 100 << 20)
        XCTAssertEqual(try ourSize(img), 100 << 20, "a Hyper-V image is not sized by its current size")
        XCTAssertNotEqual(chs, 100 << 20)
    }

    /// A footer whose checksum is wrong, and a table naming a block past the end of the file:
    /// refused with the file and the reason named, as qemu-img refuses them.
    func testDamagedFooterAndTruncatedImageAreRefused() throws {
        let s = try Scratch()
        let img = s.path("bad.vhd")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vpc", img, "16M"])
        try Harness.run(["qemu-io", "-f", "vpc", "-c", "write -P 1 0 64k", img])
        let good = try Data(contentsOf: URL(fileURLWithPath: img))
        var d = good
        d[64] ^= 0xFF
        try d.write(to: URL(fileURLWithPath: img))
        XCTAssertNotEqual(try Harness.run(["qemu-img", "info", img], check: false).status, 0)
        try s.assertMountRefused(["-r", img], mentions: ["bad.vhd", "checksum"], "footer checksum")
        // Cut the file inside its one block.
        try good.prefix(good.count - 512 - 1 << 20).write(to: URL(fileURLWithPath: img))
        XCTAssertNotEqual(try Harness.run(["qemu-img", "info", img], check: false).status, 0)
        try s.assertMountRefused(["-r", img], mentions: ["bad.vhd", "truncated"], "truncated")
        XCTAssertEqual(be32(good, 0), 0x636F_6E65)  // ("cone", the cookie the probe keys on)
    }

    /// Writing VHD is not there yet: create and convert refuse it before printing or
    /// creating anything.
    func testCreatingAVHDIsRefusedCleanly() throws {
        let s = try Scratch()
        let img = s.path("new.vhd")
        let r = try Harness.run([Harness.rawmount, "create", "-f", "vpc", img, "1M"], check: false)
        XCTAssertNotEqual(r.status, 0)
        XCTAssertEqual(r.out, "", "it announced an image it does not make")
        XCTAssertFalse(FileManager.default.fileExists(atPath: img))
    }
}
