import BlockEngine
import Foundation

/// Where the parent of a VirtualBox differencing image is. VirtualBox links them in its
/// media registry, not by file name; on disk the child names only its parent's UUID. A VM
/// keeps its base disk in the VM folder and snapshot images in its Snapshots folder, so the
/// child's own folder and the one above it are searched for a .vdi with that UUID.
enum VDIParent {
    static let maxCandidates = 4096

    static func find(for child: String, header: VDIHeader) throws -> String {
        let dir = (child as NSString).deletingLastPathComponent
        let up = (dir as NSString).deletingLastPathComponent
        var looked = 0
        for folder in [dir.isEmpty ? "." : dir, up.isEmpty ? "." : up] {
            let names = (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []
            for name in names.sorted() where name.lowercased().hasSuffix(".vdi") {
                let path = (folder as NSString).appendingPathComponent(name)
                guard path != child, looked < maxCandidates else { continue }
                looked += 1
                guard let f = try? ImageFile(path: path, writable: false) else { continue }
                guard let raw = try? f.readBytes(count: 512, at: 0, what: "VDI header"), VDIHeader.probe(raw) else { continue }
                if VDIHeader(raw: raw).uuidImage == header.uuidLink { return path }
            }
        }
        throw BlockError.invalid(file: child, field: "parent image",
                                 detail: "this VirtualBox differencing image needs its parent \(VDIHeader.uuidText(header.uuidLink)), "
                                    + "and no .vdi with that UUID is in \(dir.isEmpty ? "." : dir) or the folder above it")
    }
}
