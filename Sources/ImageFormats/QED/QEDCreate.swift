import BlockEngine

/// Creates an empty QED image laid out as qemu-img does: header cluster, then the L1 table.
public enum QEDCreate {
    public static func create(path: String, size: UInt64, clusterSize: UInt32 = 64 << 10, tableSize: UInt32 = 4,
                              backing: String? = nil, backingIsRaw: Bool = false) throws {
        var h = QEDHeader(clusterSize: clusterSize, tableSize: tableSize, headerSize: 1, features: 0,
                          compatFeatures: 0, autoclearFeatures: 0, l1TableOffset: UInt64(clusterSize),
                          imageSize: size, backingNameOffset: 0, backingNameSize: 0)
        var nameBytes: [UInt8] = []
        if let backing {
            nameBytes = Array(backing.utf8)
            h.features |= QEDHeader.featureBackingFile
            if backingIsRaw { h.features |= QEDHeader.featureBackingNoProbe }
            h.backingNameOffset = 64
            h.backingNameSize = UInt32(nameBytes.count)
        }
        let fileSize = h.l1TableOffset + h.tableBytes
        try h.validate(path: path, fileSize: fileSize)
        try ImageFile.createComplete(path: path) { file in
            try file.truncate(to: fileSize)
            try file.write(h.encoded() + nameBytes, at: 0)
        }
    }
}
