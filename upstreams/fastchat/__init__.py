"""The FastChat adapter: controller and worker client, caches, conversation templates."""
