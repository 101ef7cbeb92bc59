import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

/// Creates a VDI 1.1 image laid out as qemu-img does: header sector, block map, data.
public enum VDICreate {
    public static func create(path: String, size: UInt64, isStatic: Bool) throws {
        let blockSize = UInt64(VDIHeader.blockSizeRequired)
        let diskSize = size.alignedUp(512)
        let blocks = (diskSize + blockSize - 1) / blockSize
        guard blocks <= UInt64(VDIHeader.maxBlocks) else { throw BlockError.usage("\(path): \(size) bytes is too large for VDI") }
        let mapBytes = (blocks * 4).alignedUp(512)
        let offsetBmap: UInt64 = 512, offsetData = offsetBmap + mapBytes
        var raw = [UInt8](repeating: 0, count: 512)
        let text = Array("<<< QEMU VM Virtual Disk Image >>>\n".utf8)
        raw.replaceSubrange(0..<text.count, with: text)
        put32(&raw, 0x40, VDIHeader.signature)
        put32(&raw, 0x44, VDIHeader.version11)
        put32(&raw, 0x48, 0x180)
        put32(&raw, 0x4C, isStatic ? 2 : 1)
        put32(&raw, 0x154, UInt32(offsetBmap))
        put32(&raw, 0x158, UInt32(offsetData))
        put32(&raw, 0x168, 512)
        put64(&raw, 0x170, diskSize)
        put32(&raw, 0x178, UInt32(blockSize))
        put32(&raw, 0x180, UInt32(blocks))
        put32(&raw, 0x184, isStatic ? UInt32(blocks) : 0)
        raw.replaceSubrange(0x188..<0x198, with: randomGUID())
        raw.replaceSubrange(0x198..<0x1A8, with: randomGUID())
        var map = [UInt8](repeating: 0, count: Int(mapBytes))
        for i in 0..<Int(blocks) { put32(&map, i * 4, isStatic ? UInt32(i) : VDIHeader.blockFree) }
        try ImageFile.createComplete(path: path) { file in
            try file.write(raw, at: 0)
            try file.write(map, at: offsetBmap)
            try file.truncate(to: offsetData + (isStatic ? blocks * blockSize : 0))
        }
    }
}
